"""A lost rank, in-process: which errors say a rank was lost, what is
survivable where, and the global batch the survivors keep. The job itself
(3 ranks, one killed, under Open MPI's ULFM) is in test_open_mpi.py."""

from __future__ import annotations

import pytest

from transparent_dist.core import config, elastic, shard_plan, world
from transparent_dist.core.collectives import is_process_failure


def test_the_errors_of_a_lost_rank_are_told_from_others():
    from mpi4py import MPI

    # The native op's status carries MPI's code; mpi4py raises its class.
    native = RuntimeError(f"transparent_dist: MPI_Allreduce failed with code {MPI.ERR_PROC_FAILED}")
    assert is_process_failure(native)
    assert is_process_failure(MPI.Exception(MPI.ERR_REVOKED))
    assert is_process_failure(ValueError("MPI_ERR_PROC_FAILED: Process Failure"))
    # Wrapped by TensorFlow or by the script: the cause counts.
    try:
        try:
            raise MPI.Exception(MPI.ERR_PROC_FAILED)
        except MPI.Exception as cause:
            raise RuntimeError("the step failed") from cause
    except RuntimeError as wrapped:
        assert is_process_failure(wrapped)
    assert not is_process_failure(MPI.Exception(MPI.ERR_TRUNCATE))
    assert not is_process_failure(RuntimeError(f"MPI_Allreduce failed with code {MPI.ERR_TYPE}"))
    assert not is_process_failure(ValueError("bad value in a callback"))


def test_without_ulfm_or_with_elastic_off_the_error_is_raised_again(monkeypatch):
    from mpi4py import MPI

    lost = MPI.Exception(MPI.ERR_PROC_FAILED)
    # A world of one rank (and this process's MPI has no ULFM switched on).
    with pytest.raises(MPI.Exception):
        elastic.recover(lost)
    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2))
    monkeypatch.setattr(world, "survives_lost_ranks", lambda: True)
    assert elastic.available()
    monkeypatch.setattr(config.SETTINGS, "elastic", "off")
    assert not elastic.available()
    with pytest.raises(MPI.Exception):
        elastic.recover(lost)


def test_the_settings_are_checked():
    with pytest.raises(ValueError, match="TD_ELASTIC='maybe' is not one of: auto, off"):
        config.from_environment({"TD_ELASTIC": "maybe"})
    with pytest.raises(ValueError, match="TD_MIN_RANKS='0' must be >= 1"):
        config.from_environment({"TD_MIN_RANKS": "0"})
    assert config.from_environment({"TD_MIN_RANKS": "2"}).min_ranks == 2


def test_the_survivors_keep_the_global_batch(monkeypatch):
    # Started on 3 ranks, 2 left: a per-rank batch of 24 still means 72.
    monkeypatch.setattr(world, "_WORLD", world.World(rank=1, size=2, started_size=3))
    assert shard_plan.global_batch(24) == 72
    plan = shard_plan.ShardPlan.for_call(24, False, seed=0)
    assert (plan.size, plan.global_batch, plan.local_batch) == (2, 72, 36)
    monkeypatch.setattr(world, "_WORLD", world.World(rank=1, size=2))
    assert shard_plan.global_batch(24) == 48


def test_a_loss_says_where():
    loss = elastic.Loss((2,), ("node1",), 3, 2, 0, 0, 0.1)
    assert loss.where() == "rank 2 (on node1)"
    assert elastic.Loss((1, 2), ("a", "a"), 4, 2, 0, 0, 0.1).where() == "ranks 1, 2 (on a)"


def test_the_resume_hint_names_the_newest_checkpoint(monkeypatch, tmp_path):
    from transparent_dist.core import checkpoint

    assert elastic.where_to_resume() == (
        "no checkpoint (TD_CHECKPOINT_DIR is not set): the same command starts afresh"
    )
    directory = str(tmp_path / "ckpt")
    monkeypatch.setattr(config.SETTINGS, "checkpoint_dir", directory)
    checkpoint.require_private(directory)
    assert (
        elastic.where_to_resume()
        == f"no checkpoint in {directory} yet: the same command starts afresh"
    )
    path = checkpoint.save(directory, [], {"global_step": 14})
    assert elastic.where_to_resume() == f"the same command resumes from the checkpoint {path}"


class _Base:
    """Stands in for Keras's `Callback`."""

    def __init__(self):
        self.model = self.params = None

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class _Recording(_Base):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: self.calls.append((name, *args))
        raise AttributeError(name)


class CSVLogger(_Recording):
    append = False

    def on_train_begin(self, logs=None):
        self.calls.append(("on_train_begin", self.append))


def _a_resumed_run(callback, fresh, resume):
    from transparent_dist.adapters import keras_elastic

    wrapped = keras_elastic._continued_class(_Base)(callback, fresh, resume)
    wrapped.set_model("model")
    wrapped.on_train_begin()
    for epoch in (1, 2):
        wrapped.on_epoch_begin(epoch)
        for batch in (0, 1):
            wrapped.on_train_batch_begin(batch)
            wrapped.on_train_batch_end(batch, {"loss": 1.0})
        wrapped.on_epoch_end(epoch, {"loss": 1.0})
    wrapped.on_train_end()
    return wrapped


def test_the_scripts_callbacks_go_on_where_they_were_after_a_loss(monkeypatch):
    from transparent_dist.adapters import keras_elastic, root_output

    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2))
    # Lost in epoch 2 (1 here, 0-based) after 4 of its steps: the callback
    # had that epoch's begin; its batches go on from 4.
    resume = keras_elastic.Resume(epoch=1, step=4, iterations=10, history=None, begun=True)
    callback = _Recording()
    wrapped = _a_resumed_run(callback, False, resume)
    assert callback.model == "model"
    assert callback.calls == [
        ("on_train_batch_begin", 4, None),
        ("on_train_batch_end", 4, {"loss": 1.0}),
        ("on_train_batch_begin", 5, None),
        ("on_train_batch_end", 5, {"loss": 1.0}),
        ("on_epoch_end", 1, {"loss": 1.0}),
        ("on_epoch_begin", 2, None),
        ("on_train_batch_begin", 0, None),
        ("on_train_batch_end", 0, {"loss": 1.0}),
        ("on_train_batch_begin", 1, None),
        ("on_train_batch_end", 1, {"loss": 1.0}),
        ("on_epoch_end", 2, {"loss": 1.0}),
        ("on_train_end",),
    ]
    assert wrapped.inner is callback
    # A writing callback on the rank that took over from a lost rank 0:
    # it begins here (its file appended to), and its silence is lifted.
    logger = CSVLogger()
    logger.on_train_end = root_output.no_op
    _a_resumed_run(logger, True, resume)
    assert logger.calls[:2] == [("on_train_begin", True), ("on_epoch_begin", 1, None)]
    assert logger.calls[-1] == ("on_train_end",)
    assert logger.append is False and "on_train_end" not in vars(logger)


def test_data_the_survivors_cannot_re_split_ends_the_job(monkeypatch):
    """After a loss, fit's data decides whether the survivors go on: arrays
    and tf.data datasets are re-split with the same global batches; a
    generator (cannot go back), a PyDataset (dealt in whole batches, not
    resumable mid-epoch) and rows a reader split by rank (the lost rank's
    are gone) end the job with the reason. The line of a dataset says how
    its steps keep their batches."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transparent_dist.adapters import keras_elastic
    from transparent_dist.adapters.keras3_tensorflow import FRAMEWORK as fw
    from transparent_dist.core.sharding import rank_rows

    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2, started_size=3))

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.zeros((4, 2)), np.zeros(4)

    def why(**arguments):
        return keras_elastic._why_not_go_on(fw, {"x": None, "y": None, **arguments})

    x, y = np.zeros((12, 2), "float32"), np.zeros(12, "float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    assert why(x=x, y=y) is None
    assert why(x=dataset, validation_data=Batches()) is None
    assert why(x=(b for b in [(x, y)])) == (
        "the training data is a Python generator, which cannot go back to the last step "
        "every rank completed"
    )
    assert "is a keras.utils.PyDataset" in why(x=Batches())
    assert "the lost rank's rows are on no survivor" in why(x=rank_rows(x), y=rank_rows(y))
    assert why(x=x, y=y, validation_data=(rank_rows(x), rank_rows(y))).startswith(
        "the validation data is already split by rank"
    )
    assert keras_elastic._batch_words(fw, {"x": dataset}, 2) == (
        "each step the same 3 batches of the dataset, joined and split by rows over the 2 ranks"
    )
    assert keras_elastic._batch_words(fw, {"x": x, "y": y, "batch_size": 24}, 2) == (
        "the same global batch of 72 (36 per rank)"
    )


def test_step_counts_keep_the_ranks_the_job_started_with(monkeypatch):
    """`steps_per_epoch=18` of the script's batches on 3 ranks is 6 steps of
    3 batches; the survivors of a loss (2, then 1) run the same 6 steps of
    the same 3 batches (before: 9 steps on 2 ranks, 18 on 1)."""
    import tensorflow as tf

    from transparent_dist.adapters import step_counts
    from transparent_dist.tf import inputs as tf_inputs

    dataset = tf.data.Dataset.range(432).batch(24).repeat()
    data = tf_inputs.classify(dataset, None, None)
    for size in (3, 2, 1):
        monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=size, started_size=3))
        a = {"steps_per_epoch": 18, "validation_data": None, "x": dataset}
        passes = step_counts.Passes(
            step_counts.Pass(None, None), step_counts.Pass(None, None), 3, None
        )
        assert step_counts.before_validation_is_sharded(None, a, data, None).per_step == 3
        step_counts.adjust(a, passes)
        assert a["steps_per_epoch"] == 6, size


def test_datasets_whose_interrupted_epoch_cannot_be_read_again_end_the_job(monkeypatch):
    """A loss mid-epoch: a dataset that reshuffles on each pass (its
    interrupted order cannot be drawn again), one of unknown length lost in
    its first epoch (the epoch's length not known yet), and batches that
    cannot be joined (padded_batch) end the job; a loss in validation, or
    a dataset shuffled once (reshuffle_each_iteration=False), goes on."""
    import numpy as np
    import tensorflow as tf

    from transparent_dist.adapters import keras_elastic
    from transparent_dist.adapters.keras3_tensorflow import FRAMEWORK as fw

    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2, started_size=3))
    rows = tf.data.Dataset.from_tensor_slices((np.zeros((12, 2), "f"), np.zeros(12, "f")))
    mid = keras_elastic.Resume(epoch=1, step=2, iterations=8, history=None, steps=6)
    in_validation = keras_elastic.Resume(
        epoch=1, step=6, iterations=12, history=None, steps=6, logs={"loss": 1.0}
    )

    class Noted:
        def __init__(self, steps):
            self.data_steps, self._steps = None, steps

        def steps(self):
            return self._steps

    def why(x, resume=mid, steps=6):
        return keras_elastic._why_not_go_on(fw, {"x": x}, Noted(steps), resume)

    shuffled = rows.shuffle(12, seed=1).batch(4).prefetch(1)
    assert "reshuffles on each pass" in why(shuffled)
    assert why(shuffled, in_validation) is None
    assert why(rows.shuffle(12, seed=1, reshuffle_each_iteration=False).batch(4)) is None
    unknown = rows.filter(lambda *_: True).batch(4)
    assert why(unknown) is None
    assert "of unknown length, lost in its first epoch" in why(unknown, steps=None)
    words = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1], [2, 3], [4, 5, 6]]))
    padded = words.map(lambda w: (w, 0.0)).padded_batch(2)
    assert "differ in shape past their first dimension" in why(padded)
