"""`steps_per_epoch` / `validation_steps` under N ranks
(transparent_dist/adapters/step_counts.py): with TD_STEPS=batches (the
default) they count the script's batches, so a count computed as
`n // batch_size` keeps the epoch one pass over the data; TD_STEPS=global
keeps them as global steps.

The job runs corpus scripts on 2 ranks at per-rank batch 16 under both
settings (tests/jobs/step_counts_check.py) next to one plain process at 32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import JOBS, ROOT, background, background_result, load_ranks, run

CORPUS = ROOT / "tests" / "corpus"
COSMOFLOW = str(CORPUS / "cosmoflow_tfrecord.py")
TPU_GUIDE = str(CORPUS / "tpu_guide_steps.py")
# Corpus scripts with a constant steps_per_epoch.
BUDGETS = {"mnist_lazy_sequential": 8, "generator_input": 10}
B = 16


# ------------------------------------------------------------ arithmetic


def test_a_count_of_n_over_b_becomes_the_count_of_one_process_at_n_b():
    from transparent_dist.adapters.step_counts import Pass, scaled

    unknown = Pass(None, None)  # an infinite or unknown-length stream
    for n in range(1, 700, 13):
        for b in (1, 3, 16, 200):
            for size in (2, 3, 4, 7):
                if n // b:
                    assert scaled(n // b, unknown, size) == max(1, n // (size * b)), (n, b, size)


def test_a_pass_over_finite_data_stays_one_pass_and_a_repeat_lasts_its_epochs():
    from transparent_dist.adapters.step_counts import Pass, scaled

    for batches in range(1, 60):
        for size in (2, 3, 5):
            per_rank = math.ceil(batches / size)  # the round-robin split's steps
            assert scaled(batches, Pass(batches, per_rank), size) == per_rank
            for epochs in (2, 3, 4) if batches >= size else ():
                # dataset.repeat(epochs), steps_per_epoch = one pass (of at
                # least a batch per rank: an epoch has at least one step).
                total = epochs * batches
                steps = scaled(batches, Pass(total, math.ceil(total / size)), size)
                assert 1 <= steps and epochs * steps <= math.ceil(total / size)


def test_the_setting_takes_its_two_values_and_names_a_wrong_one():
    from transparent_dist.core import config

    assert config.Settings().steps == "batches"
    assert config.from_environment({"TD_STEPS": "Global"}).steps == "global"
    with pytest.raises(ValueError, match="TD_STEPS='per_rank' is not one of: batches, global"):
        config.from_environment({"TD_STEPS": "per_rank"})
    assert "TD_STEPS" in config.shared(config.Settings())


# ------------------------------------------------------------ on 2 ranks


# The one-process reference, in the background lane (conftest.background).
REFERENCE = background(
    "step_counts-reference",
    __file__,
    lambda out: [
        str(JOBS / "corpus_runner.py"),
        str(out),
        "reference",
        str(2 * B),
        COSMOFLOW,
        *(str(CORPUS / f"{name}.py") for name in BUDGETS),
    ],
)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_counts")
    budgets = [str(CORPUS / f"{name}.py") for name in BUDGETS]
    finished = run(
        [
            "-m",
            "transparent_dist",
            str(JOBS / "step_counts_check.py"),
            str(out),
            str(B),
            "global:" + ",".join([COSMOFLOW, *budgets]),
            f"batches:{COSMOFLOW},{TPU_GUIDE}",
        ],
        ranks=2,
    ).check()
    background_result("step_counts-reference").check()
    return {
        "dir": out,
        "stderr": finished.stderr,
        "ranks": load_ranks(out, "job", 2),
        "reference": load_ranks(REFERENCE, "reference", 1)[0],
    }


def _close(got, want, what):
    assert sorted(got) == sorted(want), what
    for key in want:
        np.testing.assert_allclose(
            got[key], want[key], atol=1e-5, rtol=1e-5, err_msg=f"{what} {key}"
        )


@pytest.mark.mpi
def test_a_dataset_repeated_for_its_epochs_lasts_them_and_rank_0_says_so_once(job):
    for rank, result in enumerate(job["ranks"]):
        run_ = result["batches/cosmoflow_tfrecord"]
        # 12 script batches of 16 per epoch: 6 steps of 2 batches, every epoch.
        assert run_["epoch_steps"] == [[6, 6]], f"rank {rank}"
        (history,) = run_["histories"]
        assert all(0 < v < 10 for v in history["loss"] + history["val_loss"]), history
        # Epoch 1 (the learning rate is the warm-up's start, whatever the
        # batch size) is one process's at 32, number for number.
        want = job["reference"]["cosmoflow_tfrecord"]["histories"][0]
        _close({k: v[:1] for k, v in history.items()}, {k: v[:1] for k, v in want.items()}, "")
    checkpoints = job["dir"] / "batches" / "cosmoflow_tfrecord" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f"checkpoint-00{e}.keras" for e in (1, 2)
    ]
    stderr = job["stderr"]
    said = "count batches of the script's own batch size (TD_STEPS=batches)"
    # Once per message, by rank 0 only: the TPU guide's two fits say it once.
    assert stderr.count(said) == 2, stderr[-3000:]
    assert stderr.count("fit: steps_per_epoch=12 and validation_steps=3 count") == 1
    assert stderr.count("fit: steps_per_epoch=30 and validation_steps=6 count") == 1
    assert "fit runs 6 and 1 steps" in stderr
    assert "Set TD_STEPS=global to run 12 and 3 steps of 2 batches each" in stderr
    # 480 // 16 = 30 script batches: 15 steps (16 in the second fit, whose
    # executions of 4 steps Keras runs whole).
    assert job["ranks"][0]["batches/tpu_guide_steps"]["epoch_steps"] == [[15, 15], [16, 16]]


@pytest.mark.mpi
def test_control_with_global_steps_the_repeated_dataset_runs_out_in_epoch_2(job):
    for result in job["ranks"]:
        # 12 steps of 2 batches: the 24 batches of repeat(2) last one epoch;
        # epoch 2 finds no data (at most the update Keras starts before it
        # learns so), logs a loss of 0 and is checkpointed all the same.
        run_ = result["global/cosmoflow_tfrecord"]
        (steps,) = run_["epoch_steps"]
        assert steps[0] == 12 and steps[1] <= 1, steps
        assert run_["histories"][0]["loss"][1] == 0.0
    assert "Your input ran out of data" in job["stderr"]
    checkpoints = job["dir"] / "global" / "cosmoflow_tfrecord" / "checkpoints"
    assert (checkpoints / "checkpoint-002.keras").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_constant_step_budgets_with_global_steps_equal_one_process_at_n_b(job, script):
    reference = job["reference"][script]
    for rank, result in enumerate(job["ranks"]):
        got = result[f"global/{script}"]
        steps = BUDGETS[script]
        assert got["epoch_steps"] == [[steps, steps]], f"rank {rank}"
        for name, want in reference["weights"].items():
            np.testing.assert_allclose(
                got["weights"][name], want, atol=1e-5, rtol=0, err_msg=f"{script} {name}"
            )
        for history, want in zip(got["histories"], reference["histories"], strict=True):
            _close(history, want, script)
