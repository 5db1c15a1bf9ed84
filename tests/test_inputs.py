"""Inputs at the edges: fewer samples than ranks, generators whose ranks
disagree on their length, and the fit summary's per-step figures under
`steps_per_execution`. The equivalence with one process of `predict` and
`evaluate` on few rows (and of a tracker's History) is in
test_keras_core.py (`few_rows`, `tracker_tail`), the keras-io VAE that
decodes one point per `predict` in test_corpus.py (`vae_predict_one`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import JOBS, run


def test_a_generator_read_to_tell_its_size_is_given_back_whole():
    pytest.importorskip("tensorflow")
    from transparent_dist.tf import inputs

    data = inputs.classify(((i, i) for i in range(5)), None, None)
    assert data.kind == "generator"
    data, small = inputs.fewer_than_ranks(data, "the generator")
    assert not small  # one process: 5 batches, not fewer than 1 rank
    assert list(data.x) == [(i, i) for i in range(5)]


def test_fit_summary_counts_steps_not_calls_of_steps_per_execution(monkeypatch):
    pytest.importorskip("keras")
    from transparent_dist.adapters import keras3_tensorflow, keras_callbacks
    from transparent_dist.core import timeline

    said = []
    monkeypatch.setattr(
        keras_callbacks.log, "info", lambda message, once=True: said.append(message)
    )
    monkeypatch.setattr(
        keras_callbacks.timeline,
        "stats",
        lambda: timeline.Stats(exchange_seconds=2.06, exchange_bytes=7.7e8, samples=1e4),
    )
    summary = keras_callbacks.for_framework(keras3_tensorflow.FRAMEWORK).FitSummary()
    # Two epochs of 103 steps at steps_per_execution=50: three calls each,
    # the last one reaching past the epoch's end (steps 100..149).
    summary.set_params({"steps": 103, "epochs": 2})
    summary.on_train_begin()
    for _ in range(2):
        for first in (0, 50, 100):
            summary.on_train_batch_begin(first)
            summary.on_train_batch_end(first + 49)
    summary.on_train_end()
    assert summary._steps == 206
    line = next(m for m in said if m.startswith("fit:"))
    assert f"({1e3 * 2.06 / 206:.2f} ms/step, {7.7e8 / 206 / 1e6:.1f} MB/step)" in line


@pytest.mark.mpi
def test_uneven_generator_ends_the_job_and_too_few_samples_say_why():
    """Three ranks: fit on 2 samples is refused with the reason (the job
    goes on, the script caught it); fits over an endless generator with
    `steps_per_epoch`, each followed by `evaluate`, all end (the framework's
    read-ahead used to take the next round's agreement on one rank after
    the last step and hang the job); then a generator that yields 22 batches
    on rank 2 and 20 on the others ends the job at once, as a dataset of
    unknown length does, instead of leaving rank 2 waiting (10 minutes)."""
    code = (
        "import numpy as np, keras, transparent_dist as td\n"
        "x = np.ones((352, 3), 'float32'); y = np.ones((352, 1), 'float32')\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "m.compile('sgd', 'mse')\n"
        "try:\n"
        "    m.fit(x[:2], y[:2], epochs=1, verbose=0)\n"
        "except ValueError as error:\n"
        "    print('refused:', error, flush=True)\n"
        "class Count(keras.callbacks.Callback):\n"
        "    def on_epoch_end(self, epoch, logs=None):\n"
        "        self.n = int(self.model.optimizer.iterations.numpy())\n"
        "def endless():\n"
        "    while True:\n"
        "        yield from ((x[i:i + 16], y[i:i + 16] * i) for i in range(0, 320, 16))\n"
        "for k in range(4):\n"
        "    m.fit(endless(), steps_per_epoch=15, epochs=2, verbose=0, callbacks=[Count()])\n"
        "    m.evaluate(x, y, verbose=0)\n"
        "print('endless generators done', flush=True)\n"
        "n = 352 if td.rank() == 2 else 320\n"
        "m.fit(((x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)), verbose=0)\n"
        "print('finished', flush=True)\n"
    )
    job = run(
        ["-m", "transparent_dist", "-c", code], ranks=3, env={"TD_STALL_ABORT": "40"}, timeout=180
    )
    assert "refused: transparent_dist: the training data has 2 sample(s), fewer than the 3" in (
        job.stdout
    )
    assert "Use at least 3 samples or at most 2 rank(s)" in job.stdout
    assert "endless generators done" in job.stdout
    assert job.returncode != 0 and "finished" not in job.stdout
    assert "the generator has a different number of batches on different ranks" in job.stderr
    assert job.seconds < 90


@pytest.mark.mpi
def test_a_script_that_seeds_nothing_draws_alike_and_trains_every_image_once(tmp_path):
    """numpy's and Python's global generators start from rank 0's state on
    every rank: unseeded synthetic data is the same everywhere, and
    `image_dataset_from_directory` without `seed=` (which draws its seed
    from numpy) lists and shuffles alike, so one epoch trains each of the
    80 images once. Control (the states not agreed): 59 distinct of 80."""
    job = run(["-m", "transparent_dist", str(JOBS / "unseeded.py"), str(tmp_path)], ranks=2)
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result == {"alike": True, "trained": 80, "distinct": 80}


@pytest.mark.mpi
def test_generators_of_padded_list_sparse_and_none_batches_train():
    """What a generator yields in keras-io scripts trains as it does alone:
    per-batch padded sequences whose lengths repeat within a rank's own
    first batches, a multi-input `[x1, x2]`, `tf.SparseTensor` batches split
    by rows in the last round, `(x, y, None)`. Control (the element spec
    from the rank's own batches, the plugin's first read-on-demand version):
    the padded, sparse and None cases crashed."""
    job = run(["-m", "transparent_dist", str(JOBS / "generator_shapes.py")], ranks=2)
    assert job.returncode == 0, job.stderr[-3000:]
    results = json.loads(job.stdout.strip().splitlines()[-1])
    assert sorted(results) == ["list", "none_weights", "padded", "sparse"]
    for case in results.values():
        assert case["alike"] and np.isfinite(case["loss"]), results
