"""Regressions for what real scripts hit (tests/jobs/regressions.py), each
with its control: the same job with the plugin off (TD_DISABLE=1), where
the failure the check guards against is visible.

The corpus (test_corpus.py) covers the rest of the numbered failures:
lazily built and subclassed models, custom train/test steps and their
logs under EarlyStopping, a Metric returning its state variable, gradients
of partly unknown shape, sparse Embedding gradients under Adam/RMSprop,
and the custom-loop warning.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import JOBS, job_env, load_ranks, run

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "regressions.py")
ACCOUNTED = ["dataset_shuffled", "dataset_unknown_length", "pydataset", "generator"]
TINY_TAIL = "arrays_tiny_tail"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out = {}
    for ranks in (2, 3):
        directory = tmp_path_factory.mktemp(f"regressions{ranks}")
        run(["-m", "transparent_dist", SCRIPT, str(directory), "plugin"], ranks=ranks).check()
        out[ranks] = {"dir": directory, "ranks": load_ranks(directory, "plugin", ranks)}
    control = tmp_path_factory.mktemp("regressions_control")
    run([SCRIPT, str(control), "control"], ranks=2, env=job_env(TD_DISABLE="1")).check()
    out["control"] = {"dir": control, "ranks": load_ranks(control, "control", 2)}
    return out


def _counts(results, scenario):
    """Per epoch, how often each sample was trained on, over all ranks."""
    n = results[0][scenario]["n"]
    epochs = len(results[0][scenario]["ids"])
    return [
        np.bincount(
            np.concatenate([r[scenario]["ids"][e] for r in results]).astype(int), minlength=n
        )
        for e in range(epochs)
    ]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("scenario", [*ACCOUNTED, TINY_TAIL])
def test_every_sample_once_per_epoch_and_no_empty_batch(jobs, ranks, scenario):
    results = jobs[ranks]["ranks"]
    for epoch, counts in enumerate(_counts(results, scenario)):
        assert counts.min() == 1 and counts.max() == 1, f"{scenario} epoch {epoch}: {counts}"
    for rank, result in enumerate(results):
        assert min(result[scenario]["smallest_batch"]) >= 1, f"rank {rank}"
        for key, values in result[scenario]["history"].items():
            assert np.all(np.isfinite(values)), f"{scenario} {key}: {values}"


def test_control_every_rank_trains_on_everything(jobs):
    counts = _counts(jobs["control"]["ranks"], "dataset_shuffled")
    assert all(c.min() == 2 for c in counts)


def test_shuffled_dataset_stays_one_permutation_across_ranks(jobs):
    # Uneven round-robin used to re-iterate the shuffled dataset on the short
    # ranks only, so from epoch 2 ranks sharded different permutations.
    counts = _counts(jobs[2]["ranks"], "dataset_shuffled")
    assert len(counts) == 3 and all((c == 1).all() for c in counts)


@pytest.mark.parametrize("ranks", [2, 3])
def test_tf_train_checkpoint_written_by_rank_0_only(jobs, ranks):
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        checkpoint = result["checkpoint"]
        assert checkpoint["saved"].endswith(f"rank{rank}/ckpt-1")
        assert [p.rsplit("/", 1)[-1] for p in checkpoint["managed"]] == ["ckpt-2", "ckpt-3"]
        assert checkpoint["save_counter"] == 3
        if rank == 0:
            assert checkpoint["files"] == [
                "checkpoint",
                "ckpt-1.data-00000-of-00001",
                "ckpt-1.index",
                "managed/checkpoint",
                "managed/ckpt-3.data-00000-of-00001",
                "managed/ckpt-3.index",
            ]
        else:
            assert checkpoint["files"] == []


def test_control_checkpoint_written_by_every_rank(jobs):
    assert all(r["checkpoint"]["files"] for r in jobs["control"]["ranks"])


@pytest.mark.parametrize("ranks", [2, 3])
def test_reader_rows_are_used_as_they_are(jobs, ranks):
    results = [r["readers"] for r in jobs[ranks]["ranks"]]
    rows = [r["rows_here"] for r in results]
    assert sum(rows) == 1000 and all(r["kind"] == "RankRows" for r in results)
    # 1000 rows at 50 per rank: 10 steps on 2 ranks (5 before: sharded twice),
    # 7 on 3 (334 rows at 50), the same on every rank.
    assert {r["steps"] for r in results} == {10 if ranks == 2 else 7}
    ids = np.concatenate([r["ids"] for r in results]).astype(int)
    assert (np.bincount(ids, minlength=1000) == 1).all()
    assert [r["predicted_rows"] for r in results] == rows


@pytest.mark.parametrize("ranks", [2, 3])
def test_seed_generator_draws_differ_by_rank_integer_seeds_do_not(jobs, ranks):
    draws = [r["draws"] for r in jobs[ranks]["ranks"]]
    for step in range(len(draws[0])):
        noise = [tuple(d[step][0]) for d in draws]
        fixed = [tuple(d[step][1]) for d in draws]
        assert len(set(noise)) == ranks, f"step {step}: {noise}"
        assert len(set(fixed)) == 1
    # Rank 0 draws what one process draws (the first key word is unchanged).
    assert draws[0][0][0] == jobs["control"]["ranks"][0]["draws"][0][0]


def test_control_draws_are_identical_on_every_rank(jobs):
    draws = [r["draws"][0][0] for r in jobs["control"]["ranks"]]
    assert draws[0] == draws[1]


def test_too_few_samples_for_the_ranks_ends_the_job_with_the_reason():
    # One sample, two ranks: no step can give every rank a sample.
    code = (
        "import numpy as np, keras, tensorflow as tf\n"
        "ds = tf.data.Dataset.from_tensor_slices("
        "(np.ones((1, 3), 'float32'), np.ones((1, 1), 'float32'))).batch(4)\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "m.compile('sgd', 'mse')\n"
        "m.fit(ds, epochs=1, verbose=0)\n"
    )
    job = run(["-m", "transparent_dist", "-c", code], ranks=2, timeout=120)
    assert job.returncode != 0
    assert "the last 1 sample(s) of the epoch cannot be spread over 2 ranks" in job.stderr
    assert job.seconds < 60


LOOKUP_TABLES = ["token", "position", "segment"]


def _one_process(jobs, name):
    """A reference of the lookups scenario (the control job's ranks share them)."""
    return next(r["lookups"][name] for r in jobs["control"]["ranks"] if name in r["lookups"])


def _lookup_gaps(trained, reference):
    """The largest difference from one process, by table."""
    gaps = {t: np.max(np.abs(np.subtract(trained[t], reference[t]))) for t in LOOKUP_TABLES}
    gaps["dense"] = max(
        np.max(np.abs(np.subtract(a, b)))
        for a, b in zip(trained["dense"], reference["dense"], strict=True)
    )
    return gaps


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_lookups_per_sample_and_shared_by_the_batch_train_as_one_process(jobs, ranks, optimizer):
    # Token rows are gathered; position rows (arange(maxlen), the same on
    # every rank) and the segment table's constant row are summed; segment
    # ids 0 in every sample (the same on every rank, but from the data) are
    # gathered. Adam and RMSprop square each row, so any other choice shows
    # (the other choices' controls: /work/notes/sparse-rule.md).
    reference = _one_process(jobs, f"{optimizer}_one_process_{ranks}")
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        gaps = _lookup_gaps(result["lookups"][optimizer], reference)
        assert max(gaps.values()) <= 1e-5, f"rank {rank}: {gaps}"


@pytest.mark.parametrize("ranks", [2, 3])
def test_control_lookups_all_gathered_differ_in_the_position_table(jobs, ranks):
    # Before the fix every row was gathered: a position's (g0 + g1)^2 became
    # g0^2 + g1^2 in Adam's second moment.
    reference = _one_process(jobs, f"adam_one_process_{ranks}")
    gaps = _lookup_gaps(jobs[ranks]["ranks"][0]["lookups"]["adam_all_gathered"], reference)
    assert gaps["position"] > 1e-3, gaps
