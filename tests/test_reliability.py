"""Batch jobs never hang: every failure ends the job promptly and says why;
SIGTERM checkpoints, and the rerun resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import JOBS, PYTHON, _mpiexec, job_env, run

from transparent_dist import checkpoint

FAULTS = str(JOBS / "faults.py")
PREEMPTIBLE = str(JOBS / "preemptible.py")


@pytest.mark.parametrize(
    "mode,limit,expected",
    [
        (
            "raise_before_fit",
            30,
            [
                "[rank 1] RuntimeError: rank 1 could not find its input",
                "rank 1 of 2 failed with RuntimeError",
            ],
        ),
        ("raise_in_callback", 30, ["ValueError: bad value in a callback", "rank 1 of 2 failed"]),
        ("sigkill", 60, ["signal 9"]),
        (
            "mismatched_model",
            30,
            ["the ranks disagree on the model and optimizer variables", "rank 1: [((8, 17)"],
        ),
    ],
)
def test_failure_ends_the_job_promptly_with_the_reason(mode, limit, expected):
    job = run(["-m", "transparent_dist", FAULTS, mode], ranks=2, timeout=120)
    assert job.returncode != 0
    assert job.seconds < limit, job.seconds
    for text in expected:
        assert text in job.stdout + job.stderr, (text, job.stderr[-3000:])
    assert "finished" not in job.stdout


def test_mismatch_is_reported_once():
    job = run(["-m", "transparent_dist", FAULTS, "mismatched_model"], ranks=2, timeout=120)
    assert job.stderr.count("the ranks disagree on the model") == 1


def test_stalled_rank_is_named_and_optionally_aborted():
    job = run(
        ["-m", "transparent_dist", FAULTS, "stall"],
        ranks=3,
        timeout=120,
        env=job_env(TD_STALL_WARN="2"),
    ).check()
    assert "rank(s) 1, which have not arrived" in job.stderr
    assert "finished" in job.stdout  # a warning only: the job goes on
    job = run(
        ["-m", "transparent_dist", FAULTS, "stall"],
        ranks=3,
        timeout=120,
        env=job_env(TD_STALL_WARN="1", TD_STALL_ABORT="3"),
    )
    assert job.returncode != 0
    assert "rank(s) 1 did not reach collective" in job.stderr
    assert "finished" not in job.stdout


def _start(out, tag, **env):
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", PREEMPTIBLE, str(out), tag]
    return subprocess.Popen(
        command, env=job_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, lines=0, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().split()) >= lines:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {lines} lines")


def _weights(out, tag, rank=0):
    return np.asarray(json.loads((out / f"{tag}-rank{rank}.json").read_text())["weights"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(["-m", "transparent_dist", PREEMPTIBLE, str(out), "full"], ranks=2).check()
    return _weights(out, "full")


def test_sigterm_checkpoints_then_the_rerun_resumes_to_the_same_weights(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    job = _start(tmp_path, "run", TD_CHECKPOINT_DIR=str(ckpt))
    _wait_for(tmp_path / "progress-rank0", lines=40)  # in the second of three epochs
    for rank in (0, 1):
        os.kill(int((tmp_path / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == checkpoint.PREEMPTED_STATUS, stderr[-3000:]
    assert time.monotonic() - sent < 30
    meta = checkpoint.peek(str(ckpt))
    assert meta["epoch"] == 1 and 0 < meta["step"] < 60
    assert not (tmp_path / "run-rank0.json").exists()  # it did stop
    resumed = run(
        ["-m", "transparent_dist", PREEMPTIBLE, str(tmp_path), "run"],
        ranks=2,
        env=job_env(TD_CHECKPOINT_DIR=str(ckpt)),
    ).check()
    assert f"resumed from {ckpt}" in resumed.stderr
    assert "ran out of data" not in resumed.stderr
    for rank in (0, 1):
        np.testing.assert_allclose(_weights(tmp_path, "run", rank), uninterrupted, atol=1e-5)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    job = _start(
        tmp_path, "run", TD_CHECKPOINT_DIR=str(ckpt), TD_CHECKPOINT_EVERY="20", SLOW_WRITE="1"
    )
    _wait_for(tmp_path / "writing")  # rank 0 is half-way through the second checkpoint
    os.kill(int((tmp_path / "pid-rank0").read_text()), signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert any(name.startswith(".ckpt-") for name in os.listdir(ckpt))  # the torn one
    arrays, meta = checkpoint.load_latest(str(ckpt))
    assert meta["global_step"] == 20 and meta["path"].endswith("ckpt-000000000020")
    resumed = run(
        ["-m", "transparent_dist", PREEMPTIBLE, str(tmp_path), "run"],
        ranks=2,
        env=job_env(TD_CHECKPOINT_DIR=str(ckpt)),
    ).check()
    assert "after step 20" in resumed.stderr
    np.testing.assert_allclose(_weights(tmp_path, "run"), uninterrupted, atol=1e-5)


def test_periodic_checkpoints_keep_the_last_k(tmp_path):
    for step in range(1, 6):
        checkpoint.save(
            str(tmp_path),
            [np.full(3, step)],
            {"epoch": 0, "step": step, "global_step": step},
            keep=3,
        )
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == [
        f"ckpt-{s:012d}" for s in (3, 4, 5)
    ]
    arrays, meta = checkpoint.load_latest(str(tmp_path))
    assert meta["global_step"] == 5 and arrays[0].tolist() == [5, 5, 5]
    os.remove(tmp_path / "latest")  # the pointer is written last; without it, the newest
    assert checkpoint.load_latest(str(tmp_path))[1]["global_step"] == 5
    assert checkpoint.parse_every("500") == (500, 0.0) and checkpoint.parse_every("90s") == (
        0,
        90.0,
    )
    with pytest.raises(ValueError):
        checkpoint.parse_every("often")


def test_keras_backup_and_restore_and_initial_epoch_keep_working(tmp_path):
    script = str(JOBS / "backup_restore.py")
    for phase in ("1", "2", "3"):
        run(["-m", "transparent_dist", script, str(tmp_path), phase], ranks=2).check()
    first = [json.loads((tmp_path / f"phase1-rank{r}.json").read_text()) for r in (0, 1)]
    second = [json.loads((tmp_path / f"phase2-rank{r}.json").read_text()) for r in (0, 1)]
    third = [json.loads((tmp_path / f"phase3-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["interrupted_after"] == [0, 1, 2] and r["backup_exists"] for r in first)
    # Restored on every rank from rank 0's backup: only epochs 2 and 3 run,
    # and rank 0 deleted the backup at the end.
    assert all(r["epochs_run"] == [2, 3] for r in second)
    assert not second[0]["backup_exists"]
    assert second[0]["weights"] == second[1]["weights"]
    assert all(r["epochs_run"] == [2, 3] and r["history"] == 2 for r in third)
