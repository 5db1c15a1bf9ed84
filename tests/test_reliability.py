"""Batch jobs never hang: every failure ends the job promptly and says why;
SIGTERM checkpoints, and the rerun resumes to the same weights."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    JOBS,
    PYTHON,
    Finished,
    _mpiexec,
    job_env,
    leftovers,
    outcome,
    run,
    selected,
    side_by_side,
)

from transparent_dist.core import checkpoint, config, preemption

FAULTS = str(JOBS / "faults.py")
PREEMPTIBLE = str(JOBS / "preemptible.py")


def _fault(mode: str, out: Path, **env: str) -> tuple[Finished, str]:
    marker = str(out / mode)
    job = run(
        ["-m", "transparent_dist", FAULTS, mode],
        ranks=3 if mode == "stall" else 2,
        timeout=120,
        env=job_env(FAULT_OUT=marker, **env),
    )
    return job, marker


@pytest.fixture(scope="module")
def waiting(request, tmp_path_factory):
    """The jobs of this module's tests that end a job or wait for a bound,
    two at a time (conftest.side_by_side): a rank that sleeps, a watchdog's
    limit, a signal. Only those of the selected tests run."""
    drivers = {}
    for mode in selected(request, "test_failure_ends_the_job_promptly_with_the_reason", "mode"):
        drivers[mode] = functools.partial(_fault, mode, tmp_path_factory.mktemp(mode))
    more = {
        "test_sigterm_to_a_rank_blocked_in_a_collective_ends_the_job": _sigterm_while_blocked,
        "test_a_stopped_rank_0_is_named_by_the_other_watcher_and_the_job_ends": functools.partial(
            _fault, "stop_rank0", TD_STALL_WARN="2", TD_STALL_ABORT="6"
        ),
        "test_sigterm_after_fit_ends_the_job_as_without_the_plugin": _sigterm_after_fit,
    }
    for test, driver in more.items():
        if selected(request, test):
            drivers[test] = functools.partial(driver, out=tmp_path_factory.mktemp("waiting"))
    if selected(request, "test_stalled_rank_is_named_and_optionally_aborted"):
        for name, env in (("stall_warn", {}), ("stall_abort", {"TD_STALL_ABORT": "3"})):
            out = tmp_path_factory.mktemp(name)
            drivers[name] = functools.partial(_fault, "stall", out, TD_STALL_WARN="1", **env)
    return side_by_side(drivers)


@pytest.mark.mpi
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
        # A call that differs between ranks: named at once, never paired up
        # (the others of its kind: test_calls_that_differ_between_ranks_...).
        (
            "fit_twice",
            30,
            ["rank 0: fit #2 at faults.py:", "rank 1: the end of the script (after fit #1"],
        ),
        ("loss_on_one_rank", 30, ["rank 0 has loss='mse' where rank 1 has loss='mae'"]),
        # A signal to one rank ends the job, with a shell's status for it.
        ("sigint", 30, ["rank 1 of 2 was interrupted (SIGINT, KeyboardInterrupt)"]),
        ("sigterm", 30, ["rank 1 of 2 received SIGTERM; ending all ranks of the job"]),
    ],
)
def test_failure_ends_the_job_promptly_with_the_reason(waiting, mode, limit, expected):
    job, marker = outcome(waiting[mode])
    expected_status = {"sigint": 130, "sigterm": 143}.get(mode)
    assert job.returncode != 0 and job.returncode == (expected_status or job.returncode)
    assert job.seconds < limit, job.seconds
    for text in expected:
        assert text in job.stdout + job.stderr, (text, job.stderr[-3000:])
    assert "finished" not in job.stdout
    assert not leftovers(marker + "-pid*")
    if mode == "loss_on_one_rank":
        assert job.stderr.count("the ranks disagree on") == 1  # said once, by rank 0


# What each of these calls that differ between ranks must be named by.
DIFFERING = {
    "mismatched_model": [
        "the ranks disagree on the model and optimizer variables",
        "rank 1: [((8, 17)",
    ],
    "evaluate_vs_fit": ["rank 0: fit #1 at faults.py:", "rank 1: evaluate #1 at faults.py:"],
    "steps_on_one_rank": [
        "rank 0: fit #1 at faults.py:",
        "with steps_per_epoch=5",
        "steps_per_epoch=None",
    ],
    "adamw_on_one_rank": [
        "rank 0 has optimizer.class_name='Adam'",
        "rank 1 has optimizer.class_name='AdamW'",
    ],
}


@pytest.mark.mpi
def test_calls_that_differ_between_ranks_raise_the_same_named_error_on_every_rank(tmp_path):
    """Each is caught at its first collective and raised on every rank at
    once (a CollectiveError, a ValueError), never paired up with another
    call: one job runs them all, catching each (uncaught, such an error ends
    the job: loss_on_one_rank above)."""
    job, marker = _fault("disagreements", tmp_path)
    job.check()
    assert "finished" in job.stdout
    for rank in (0, 1):
        caught = json.loads(open(f"{marker}-caught{rank}.json").read())
        assert sorted(caught) == sorted(DIFFERING)
        for case, expected in DIFFERING.items():
            assert caught[case] and caught[case].startswith("CollectiveError: "), (case, caught)
            for text in expected:
                assert text in caught[case], (case, text, caught[case])


@pytest.mark.mpi
def test_a_rank_that_stops_training_stops_every_rank(tmp_path):
    """model.stop_training set on one rank (EarlyStopping on its own numbers
    at an epoch's end; a time budget mid-epoch): every rank stops at the same
    step, said once, instead of one rank waiting in the exchange forever."""
    job, marker = _fault("stop_one_rank", tmp_path)
    job.check()
    assert job.stderr.count("rank(s) 1 stopped training at the end of epoch 1") == 1
    assert job.stderr.count("rank(s) 1 stopped training at step 4") == 1
    # 2 epochs of 20 steps, then 1 epoch, then 4 steps: on both ranks.
    for rank in (0, 1):
        assert open(f"{marker}-rank{rank}").read().split() == ["[1,", "1]", "64"]


def _sigterm_while_blocked(out: Path) -> tuple[int, float, str, str]:
    marker = str(out / "blocked")
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", FAULTS, "sleep_long"]
    job = subprocess.Popen(
        command, env=job_env(FAULT_OUT=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(out / "blocked-sleeping")
    time.sleep(1)
    os.kill(int(open(marker + "-pid0").read()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    return job.returncode, time.monotonic() - sent, stderr.decode(), marker


@pytest.mark.mpi
def test_sigterm_to_a_rank_blocked_in_a_collective_ends_the_job(waiting):
    """Rank 1 is busy in a callback for 120 s; rank 0 waits in a collective,
    where Python cannot run its signal handler: the listener thread ends the
    job with 143 a few seconds after the SIGTERM."""
    returncode, seconds, text, marker = outcome(
        waiting["test_sigterm_to_a_rank_blocked_in_a_collective_ends_the_job"]
    )
    assert returncode == 143
    assert seconds < 15
    assert "rank 0: the main thread did not act on SIGTERM within 3 s; it is here" in text
    assert "in any_flags" in text  # the collective it waits in
    assert not leftovers(marker + "-pid*")


@pytest.mark.mpi
def test_a_stopped_rank_0_is_named_by_the_other_watcher_and_the_job_ends(waiting):
    """SIGSTOP on rank 0 (the first watcher) mid-epoch: the last rank names
    it, prints its own stack, and ends the job after TD_STALL_ABORT."""
    job, marker = outcome(
        waiting["test_a_stopped_rank_0_is_named_by_the_other_watcher_and_the_job_ends"]
    )
    assert job.returncode != 0
    assert job.seconds < 40, job.seconds
    assert "for rank(s) 0, which have not arrived (rank 0 last entered collective" in job.stderr
    assert "stack of rank 1 (waiting; in fit #1 at faults.py:" in job.stderr
    assert "rank(s) 0 did not reach collective" in job.stderr
    assert "finished" not in job.stdout
    assert not leftovers(marker + "-pid*")


@pytest.mark.mpi
def test_stalled_rank_is_named_and_optionally_aborted(waiting):
    job, _ = outcome(waiting["stall_warn"])
    job.check()
    assert "rank(s) 1, which have not arrived" in job.stderr
    # Where the late rank is, and where the others wait.
    assert "stack of rank 1 (late; in fit #1 at faults.py:" in job.stderr
    assert "[rank 1]     time.sleep(5)" in job.stderr
    assert "stack of rank 0 (waiting; in fit #1" in job.stderr
    assert "finished" in job.stdout  # a warning only: the job goes on
    job, _ = outcome(waiting["stall_abort"])
    assert job.returncode != 0
    assert "rank(s) 1 did not reach collective" in job.stderr
    assert "finished" not in job.stdout


def _start(out, tag, ranks=2, **env):
    command = [_mpiexec(), "-n", str(ranks), PYTHON, "-m", "transparent_dist", PREEMPTIBLE]
    command += [str(out), tag]
    return subprocess.Popen(
        command,
        env=job_env(**{"STEP_SECONDS": "0.1", **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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


@pytest.mark.mpi
def test_sigterm_checkpoints_then_the_rerun_resumes_to_the_same_weights(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    job = _start(tmp_path, "run", TD_CHECKPOINT_DIR=str(ckpt))
    _wait_for(tmp_path / "progress-rank0", lines=40)  # in the second of three epochs
    for rank in (0, 1):
        os.kill(int((tmp_path / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == preemption.PREEMPTED_STATUS, stderr[-3000:]
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


@pytest.mark.mpi
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
    assert config.parse_every("500") == (500, 0.0) and config.parse_every("90s") == (
        0,
        90.0,
    )
    with pytest.raises(ValueError):
        config.parse_every("often")


@pytest.mark.mpi
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


# ------------------------------------------------ the walltime, resumed anywhere

# One global batch (48) at any rank count, and no dropout (drawn per rank):
# then the run's numbers do not depend on how many ranks train it.
GLOBAL = {"TD_BATCH_SIZE": "global", "BATCH": "48", "DROPOUT": "0"}


@pytest.fixture(scope="module")
def uninterrupted_global(tmp_path_factory):
    out = tmp_path_factory.mktemp("full-global")
    run(
        ["-m", "transparent_dist", PREEMPTIBLE, str(out), "full"], ranks=2, env=job_env(**GLOBAL)
    ).check()
    return _weights(out, "full")


def _preempt(out, ranks, lines, **env):
    """Starts the job on `ranks` ranks, SIGTERMs every rank once rank 0
    has done `lines` steps; returns when it has checkpointed and exited."""
    job = _start(out, "run", ranks=ranks, **env)
    _wait_for(out / "progress-rank0", lines=lines)
    for rank in range(ranks):
        os.kill(int((out / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == preemption.PREEMPTED_STATUS, stderr[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("before,after", [(2, 3), (3, 2)])
def test_resume_at_another_rank_count_continues_at_the_exact_sample(
    tmp_path, uninterrupted_global, before, after
):
    """Preempted in epoch 2 on `before` ranks, resumed on `after`: the
    checkpoint says how many samples of the epoch were done, the resumed
    epoch starts at the next one, and the weights end equal to the
    uninterrupted run's. 3 -> 2 also finds its latest checkpoint truncated,
    and falls back to the periodic one before it (every 10 steps)."""
    ckpt = tmp_path / "ckpt"
    env = dict(GLOBAL, TD_CHECKPOINT_DIR=str(ckpt), TD_CHECKPOINT_EVERY="10")
    _preempt(tmp_path, before, lines=32, **env)
    meta = checkpoint.peek(str(ckpt))
    assert meta["world_size"] == before and meta["unit"] == "samples"
    assert meta["per_step"] == 48 and meta["consumed"] == 48 * meta["step"] > 0
    if before == 3:
        arrays = os.path.join(meta["path"], "arrays.npz")
        os.truncate(arrays, os.path.getsize(arrays) // 2)
        fallback = max(s for s in (10, 20, 30, 40) if s < meta["global_step"])
    resumed = run(
        ["-m", "transparent_dist", PREEMPTIBLE, str(tmp_path), "run"],
        ranks=after,
        env=job_env(**env),
    ).check()
    if before == 3:
        assert "skipped a checkpoint that failed its check" in resumed.stderr
        assert f"{arrays} holds" in resumed.stderr and "(truncated or replaced)" in resumed.stderr
        assert f"resumed from {ckpt}/ckpt-{fallback:012d}" in resumed.stderr
    assert f"resuming a checkpoint of {before} ranks (48 samples per step" in resumed.stderr
    assert "exactly where it stopped" in resumed.stderr
    for rank in range(after):
        np.testing.assert_allclose(_weights(tmp_path, "run", rank), uninterrupted_global, atol=1e-5)


def test_resume_at_another_global_batch_says_what_it_repeats(capsys):
    meta = {"step": 7, "epoch": 1, "world_size": 2, "unit": "samples", "per_step": 64}
    meta["consumed"] = 448
    assert checkpoint.steps_to_skip(meta, ("samples", 96), 3) == 4
    said = capsys.readouterr().err
    assert "448 done in epoch 2) on 3 ranks (96 per step): the epoch resumes after step 4" in said
    assert "64 samples before where it stopped (they are trained on again)" in said
    assert checkpoint.steps_to_skip(meta, ("samples", 64), 2) == 7  # the same job: as saved
    assert checkpoint.steps_to_skip(meta, ("samples", 32), 1) == 14
    assert "exactly where it stopped" in capsys.readouterr().err


def test_corrupt_checkpoints_are_skipped_naming_the_file(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(
            str(tmp_path), [np.full(3, step)], {"epoch": 0, "step": step, "global_step": step}
        )
    newest, middle = tmp_path / "ckpt-000000000003", tmp_path / "ckpt-000000000002"
    (newest / "meta.json").write_text("{not json")  # garbage
    os.truncate(middle / "arrays.npz", 10)  # a half-copied file
    skipped = []
    arrays, meta = checkpoint.load_latest(str(tmp_path), skipped)
    assert meta["global_step"] == 1 and arrays[0].tolist() == [1, 1, 1]
    assert f"{newest}/meta.json holds 9 bytes" in skipped[0]
    assert f"{middle}/arrays.npz holds 10 bytes" in skipped[1]
    oldest = tmp_path / "ckpt-000000000001"
    (oldest / "arrays.npz").write_bytes(b"garbage, with a manifest made to match")
    manifest = json.loads((oldest / "manifest.json").read_text())
    size, digest = checkpoint._file_digest(str(oldest / "arrays.npz"))
    manifest["arrays.npz"] = {"size": size, "sha256": digest}
    (oldest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="arrays.npz is not a readable array"):
        checkpoint.load(str(oldest))
    (oldest / "manifest.json").unlink()  # no manifest: not a checkpoint of the plugin's
    with pytest.raises(checkpoint.CheckpointError, match="has no manifest.json"):
        checkpoint.load(str(oldest))
    assert checkpoint.load_latest(str(tmp_path)) is None


def test_files_in_the_checkpoint_dir_are_never_written_through_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(victim, ckpt / "latest")
    checkpoint.save(str(ckpt), [np.zeros(2)], {"epoch": 0, "step": 1, "global_step": 1})
    assert victim.read_text() == "precious"
    assert not os.path.islink(ckpt / "latest")
    assert (ckpt / "latest").read_text() == "ckpt-000000000001\n"
    assert sorted(os.listdir(ckpt)) == ["ckpt-000000000001", "latest"]  # no litter
    assert sorted(os.listdir(ckpt / "ckpt-000000000001")) == [
        "arrays.npz",
        "manifest.json",
        "meta.json",
    ]


def test_failed_checkpoint_write_leaves_no_partial_files(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(str(tmp_path), [np.zeros(2)], {"epoch": 0, "step": 1, "global_step": 1})
    assert os.listdir(tmp_path) == []


@pytest.mark.mpi
def test_an_unwritable_checkpoint_dir_fails_at_the_start_of_fit(tmp_path):
    bad = tmp_path / "read-only"
    bad.mkdir(mode=0o555)
    if os.access(bad, os.W_OK):  # root writes anywhere: a path under a file instead
        (tmp_path / "a-file").write_text("")
        bad = tmp_path / "a-file" / "ckpt"
    job = run(
        ["-m", "transparent_dist", PREEMPTIBLE, str(tmp_path), "run"],
        ranks=2,
        timeout=120,
        env=job_env(TD_CHECKPOINT_DIR=str(bad)),
    )
    assert job.returncode == 1
    assert job.seconds < 40, job.seconds
    assert f"the checkpoint directory {bad} (TD_CHECKPOINT_DIR) cannot be written" in job.stderr
    assert not (tmp_path / "progress-rank0").exists()  # before the first step


def _sigterm_after_fit(out: Path) -> tuple[int, float, str, Path]:
    ckpt = out / "ckpt"
    job = _start(out, "run", TD_CHECKPOINT_DIR=str(ckpt), AFTER_FIT="1")
    _wait_for(out / "fit-done-rank1")  # the rank signalled is out of its fit
    os.kill(int((out / "pid-rank1").read_text()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    return job.returncode, time.monotonic() - sent, stderr, ckpt


@pytest.mark.mpi
def test_sigterm_after_fit_ends_the_job_as_without_the_plugin(waiting):
    """The checkpoint handler is gone once fit returns: SIGTERM in the
    script's next phase ends the job with 143 at once, writing nothing."""
    returncode, seconds, stderr, ckpt = outcome(
        waiting["test_sigterm_after_fit_ends_the_job_as_without_the_plugin"]
    )
    assert returncode == 143, stderr[-3000:]
    assert seconds < 15
    assert "a checkpoint will be written" not in stderr
    assert "rank 1 of 2 received SIGTERM; ending all ranks of the job with status 143" in stderr
    assert checkpoint.peek(str(ckpt)) is None  # none was due; none was written


def test_the_native_op_cache_refuses_planted_libraries(tmp_path):
    """A library under the op's name in a cache others can write, owned by
    another user, or a link, is refused before it is loaded (its constructor
    never runs); a planted lock link is not followed; a failing compiler
    leaves a marker that later builds fall back on at once."""
    run([str(JOBS / "native_cache.py"), str(tmp_path)], timeout=300).check()
    results = json.loads((tmp_path / "native_cache.json").read_text())
    assert "loose_dir is writable by group or others (mode 777)" in results["loose_dir"]
    assert "is writable by group or others (mode 666)" in results["loose_file"]
    if os.getuid() == 0:
        assert "is owned by uid 65534, not by this user" in results["other_owner"]
    assert "is a symbolic link or not a regular file" in results["symlink"]
    assert all("refusing to load or build the native op" in results[k] for k in ("symlink",))
    assert results["constructor_ran"] is False
    assert results["good"] == ""  # the control: a private cache loads
    assert "a symbolic link there is refused, never followed" in results["lock_symlink"]
    assert results["victim"] == "precious\n"
    assert "compiling exchange_op.cc failed" in results["first_failure"]
    assert "its build failed before, and the failure is remembered" in results["second_failure"]
    assert "no-such-compiler" in results["retry"]  # `build` tries again
    assert not [name for name in results["leftovers"] if name.endswith(".so")]


# ------------------------------------------------ preemption beyond Keras 3's fit

KINDS = str(JOBS / "preemptible_kinds.py")


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["tf_keras", "loop", "tf1"])
def test_every_kind_of_script_survives_the_walltime(tmp_path, kind):
    """tf_keras's fit, a tf.function GradientTape loop and a TF1 session
    loop: SIGTERM mid-run -> a checkpoint and status 75 -> the same
    command again ends with the weights of the uninterrupted run."""
    full, out, ckpt = tmp_path / "full", tmp_path / "run", tmp_path / "ckpt"
    full.mkdir()
    out.mkdir()
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", KINDS, str(out), "run"]
    env = job_env(KIND=kind, TD_CHECKPOINT_DIR=str(ckpt))
    job = subprocess.Popen(
        command,
        env={**env, "STEP_SECONDS": "0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The uninterrupted run beside it (that one mostly sleeps between steps).
    uninterrupted = []
    beside = threading.Thread(
        target=lambda: uninterrupted.append(
            run(
                ["-m", "transparent_dist", KINDS, str(full), "full"],
                ranks=2,
                env=job_env(KIND=kind),
            )
        )
    )
    beside.start()
    _wait_for(out / "progress-rank0", lines=40)  # in the second of three epochs
    for rank in (0, 1):
        os.kill(int((out / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    beside.join(timeout=300)
    uninterrupted[0].check()
    assert job.returncode == preemption.PREEMPTED_STATUS, stderr[-3000:]
    meta = checkpoint.peek(str(ckpt))
    assert 40 <= meta["global_step"] < 90
    assert not (out / "run-rank0.json").exists()
    resumed = run(["-m", "transparent_dist", KINDS, str(out), "run"], ranks=2, env=env).check()
    assert f"resumed from {ckpt}" in resumed.stderr
    assert "ran out of data" not in resumed.stderr
    for rank in (0, 1):
        np.testing.assert_allclose(_weights(out, "run", rank), _weights(full, "full"), atol=1e-5)
    if kind == "tf_keras":  # its callbacks' state resumed: same rates, same stop, all CSV rows
        expected, resumed = _results(full, "full", 0), _results(out, "run", 0)
        assert expected["stopped_epoch"] == resumed["stopped_epoch"] == 2
        assert expected["history"].keys() == resumed["history"].keys()
        for key, values in expected["history"].items():
            np.testing.assert_allclose(resumed["history"][key], values, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(expected["history"]["lr"], [9e-3, 8.1e-4, 7.29e-5], rtol=1e-5)
        np.testing.assert_allclose(_csv_values(resumed["csv"]), _csv_values(expected["csv"]), 1e-5)


# ------------------------------------------------ checkpoints of this run and this user


def _genuine(directory, steps=(2,)):
    for step in steps:
        checkpoint.save(
            str(directory), [np.full(3, step)], {"epoch": 0, "step": step, "global_step": step}
        )


def test_pruning_touches_only_the_plugins_own_checkpoints_in_number_order(tmp_path):
    """A ModelCheckpoint's ckpt-NN.keras files, folders another tool made
    under ckpt-* names (one numbered past ours, without a manifest), a link:
    never pruned, read or counted. The plugin's own go oldest first by
    number, and the one just written stays even when it is not the newest."""
    planted_files = ["ckpt-01.keras", "ckpt-000000000099.keras"]
    for name in planted_files:
        (tmp_path / name).write_text("a model")
    planted_dirs = ["ckpt-zzz", "ckpt-999999999999", "ckpt-1", "ckpt-0000000000123"]
    for name in planted_dirs:
        (tmp_path / name).mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    _genuine(elsewhere, steps=(500,))
    os.symlink(elsewhere / "ckpt-000000000500", tmp_path / "ckpt-000000000500")
    _genuine(tmp_path, steps=(3, 12, 100))
    for name in planted_files + planted_dirs:
        assert (tmp_path / name).exists(), name
    assert os.path.islink(tmp_path / "ckpt-000000000500")
    assert checkpoint._complete(str(tmp_path)) == [f"ckpt-{s:012d}" for s in (100, 12, 3)]
    assert checkpoint.load_latest(str(tmp_path))[1]["global_step"] == 100
    # A run resumed from an earlier checkpoint writes a lower number: it stays.
    checkpoint.save(str(tmp_path), [np.zeros(1)], {"epoch": 0, "step": 7, "global_step": 7}, 1)
    assert checkpoint._complete(str(tmp_path)) == ["ckpt-000000000007"]
    assert checkpoint.load_latest(str(tmp_path))[1]["global_step"] == 7
    for name in planted_files + planted_dirs:
        assert (tmp_path / name).exists(), name


def test_a_checkpoint_directory_not_this_users_alone_is_refused(tmp_path):
    """Writable by others, a link, another user's, or in a directory anyone
    can rename it in: nothing there is read, written or resumed, and the
    refusal names the directory and why. A private one works (the control)."""
    private = tmp_path / "private"
    _genuine(private)
    assert checkpoint.load_latest(str(private))[1]["global_step"] == 2
    checkpoint.probe(str(private))

    loose = tmp_path / "loose"
    shutil.copytree(private, loose)
    os.chmod(loose, 0o777)
    link = tmp_path / "link"
    os.symlink(private, link)
    cases = {loose: "is writable by group or others (mode 777)", link: "is a symbolic link"}
    if os.getuid() == 0:
        other = tmp_path / "other"
        shutil.copytree(private, other)
        os.chown(other, 65534, 65534)
        cases[other] = "is owned by uid 65534, not by this user"
    for directory, reason in cases.items():
        expected = f"refusing the checkpoint directory {directory} (TD_CHECKPOINT_DIR): it {reason}"
        for attempt in (checkpoint.load_latest, checkpoint.peek, checkpoint.probe, _genuine):
            with pytest.raises(checkpoint.CheckpointError) as caught:
                attempt(str(directory))
            assert expected in str(caught.value)
    assert sorted(os.listdir(loose)) == ["ckpt-000000000002", "latest"]  # as copied

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone can rename what is in it
    with pytest.raises(checkpoint.CheckpointError, match="where anyone can rename it"):
        checkpoint.probe(str(shared / "ckpt"))
    os.chmod(shared, 0o1777)  # /tmp's mode: ours stays ours
    checkpoint.probe(str(shared / "ckpt2"))
    assert oct(os.stat(shared / "ckpt2").st_mode & 0o777) == "0o755"


def _meta(tmp_path, **changes):
    meta = {
        "global_step": 12,
        "epoch": 1,
        "step": 2,
        "world_size": 2,
        "unit": "samples",
        "per_step": 48,
        "consumed": 96,
        "state_arrays": 3,
        "metric_arrays": 1,
        "stopped": False,
        "callbacks": {"1": {"class": "EarlyStopping", "stopped_epoch": 0, "arrays": {"w": [4, 1]}}},
        "path": str(tmp_path / "ckpt-000000000012"),
    }
    meta.update(changes)
    return meta


@pytest.mark.parametrize(
    "changes,expected",
    [
        (
            {"epoch": 10**18},
            "epoch=1000000000000000000 is not a whole number from 0 to 3 (this fit",
        ),
        ({"epoch": -1}, "epoch=-1 is not a whole number"),
        ({"epoch": 1.0}, "epoch=1.0 is not a whole number"),
        ({"epoch": "1"}, "epoch='1' is not a whole number"),
        ({"step": 2**70}, "step=1180591620717411303424 is not a whole number"),
        ({"global_step": 13}, "global_step=13, but the checkpoint is named ckpt-000000000012"),
        ({"global_step": True}, "global_step=True is not a whole number"),
        ({"world_size": 0}, "world_size=0 is not a whole number from 1"),
        ({"consumed": 95}, "consumed=95 is not step x per_step (2 x 48)"),
        ({"step": 20, "consumed": 960}, "consumed=960 is not a whole number from 0 to 240 (this"),
        ({"unit": "rows"}, "unit='rows' is neither samples nor batches"),
        ({"state_arrays": 9}, "state_arrays=9 is not a whole number from 0 to 5"),
        ({"metric_arrays": 3}, "metric_arrays=3 is not a whole number from 0 to 2"),
        ({"stopped": "yes"}, "stopped='yes' is not true or false"),
        (
            {"callbacks": {"1": {"class": "EarlyStopping", "stopped_epoch": 10**12}}},
            "callbacks[1].stopped_epoch=1000000000000 is not a whole number from -1 to 3",
        ),
        (
            {"callbacks": {"1": {"class": "EarlyStopping", "arrays": {"w": [4, 9]}}}},
            "callbacks[1].arrays.w[1]=9 is not a whole number from 0 to 1",
        ),
        ({"callbacks": {"x": {"class": "History"}}}, "callbacks[x] is not a callback's position"),
        (
            {"history": {"epoch": [0, 1, 7]}},
            "history.epoch[2]=7 is not a whole number from -1 to 3",
        ),
        ({"unsaved": [3]}, "unsaved is not a list of callback names"),
    ],
)
def test_numbers_read_from_a_checkpoint_are_bounded(tmp_path, changes, expected):
    limits = {"epochs": 3, "samples": 240}
    checkpoint.validate(_meta(tmp_path), 5, limits)  # the control: as written
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.validate(_meta(tmp_path, **changes), 5, limits)
    assert str(caught.value).startswith(f"{tmp_path}/ckpt-000000000012/meta.json: ")
    assert expected in str(caught.value)


def test_run_identity_names_what_differs():
    from transparent_dist.core import run_identity

    saved = {"compile": {"optimizer": {"learning_rate": 0.009999999776482582}}, "model": [1, 2]}
    assert run_identity.differences(saved, saved) == []
    assert run_identity.differences(None, saved) == []  # written without one: not checked
    now = {"compile": {"optimizer": {"learning_rate": 0.05}}, "model": [1, 2, 3], "data": {}}
    assert run_identity.differences(saved, now) == [
        "compile.optimizer.learning_rate is 0.01 in the checkpoint, 0.05 in this run",
        "data is new in this run ({})",
        "model has 2 entries in the checkpoint, 3 here",
    ]


def _results(out, tag, rank):
    return json.loads((out / f"{tag}-rank{rank}.json").read_text())


def _saved_models(directory):
    """The weights in each `.keras` file ModelCheckpoint wrote in `directory`
    (read with h5py from the zip: no Keras in the test process)."""
    import io
    import zipfile

    import h5py

    found = {}
    for path in sorted(directory.glob("*.keras")):
        with zipfile.ZipFile(path) as archive:
            data = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(data, "r") as f:
            arrays = {}
            f.visititems(
                lambda name, item, arrays=arrays: (
                    arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None
                )
            )
        found[path.name] = arrays
    return found


@pytest.mark.mpi
def test_every_stateful_keras_callback_resumes_as_if_uninterrupted(tmp_path):
    """EarlyStopping (restoring its best weights), ReduceLROnPlateau,
    ModelCheckpoint (best only, writing ckpt-NN.keras into the checkpoint
    directory itself, beside folders planted there), LearningRateScheduler,
    CSVLogger, BackupAndRestore, TerminateOnNaN and History, all in one
    script. SIGTERM on 2 ranks at a step drawn at random (mid-epoch), resumed
    on 3 ranks and SIGTERM again at the last step of the epoch in which
    EarlyStopping stops (the checkpoint is written once that epoch's
    callbacks ran, and says training stopped), resumed on 2 ranks: everything
    ends as in the uninterrupted run: stop epoch, best epoch, learning rate,
    weights, history, CSV rows, saved models. A callback of the script's own
    whose state changed is named once at each resume."""
    script = str(JOBS / "preemptible_callbacks.py")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    planted = ["ckpt-zzz", "ckpt-999999999999", "ckpt-1"]
    for name in planted:
        (ckpt / name).mkdir()
    written = []
    for ranks, phase, kill_at in [(2, "first", "random:1"), (3, "resume", "stop")]:
        env = job_env(TD_CHECKPOINT_DIR=str(ckpt), TD_BATCH_SIZE="global", KILL_AT=kill_at)
        job = run(["-m", "transparent_dist", script, str(tmp_path), phase], ranks=ranks, env=env)
        assert job.returncode == preemption.PREEMPTED_STATUS, job.stderr[-3000:]
        written.append(checkpoint.path_for(str(ckpt), int((tmp_path / "kill_at").read_text())))
        assert f"checkpoint written to {written[-1]}; exiting with status 75" in job.stderr
        assert checkpoint.peek(str(ckpt))["path"] == written[-1]  # the newest, not pruned
        if phase == "resume":
            assert f"resumed from {written[0]}: epoch 2, after step 2" in job.stderr
            assert job.stderr.count("the state of callback(s) StepCounter (seen) changed") == 1
    env = job_env(TD_CHECKPOINT_DIR=str(ckpt), TD_BATCH_SIZE="global")
    job = run(["-m", "transparent_dist", script, str(tmp_path), "resume"], ranks=2, env=env)
    job.check()
    assert f"resumed from {written[1]}: training had stopped after epoch 9" in job.stderr
    assert job.stderr.count("the state of callback(s) StepCounter (seen) changed") == 1

    reference = _results(tmp_path, "ref", 0)
    assert reference["stopped_epoch"] == 8 and reference["best_epoch"] == 5  # the plateau
    assert reference["learning_rate"] < 0.003 and not reference["backup_left"]
    for rank in range(2):
        result = _results(tmp_path, "run", rank)
        np.testing.assert_allclose(result["weights"], reference["weights"], atol=1e-5)
        assert result["epoch"] == reference["epoch"]
        assert result["history"].keys() == reference["history"].keys()
        for key, values in reference["history"].items():
            np.testing.assert_allclose(result["history"][key], values, rtol=1e-5, err_msg=key)
        assert result["stopped_epoch"] == reference["stopped_epoch"]
        assert result["best_epoch"] == reference["best_epoch"]
        np.testing.assert_allclose(result["learning_rate"], reference["learning_rate"], rtol=1e-6)
    result = _results(tmp_path, "run", 0)
    assert not result["backup_left"]
    assert result["csv"].startswith("epoch,learning_rate,loss,val_loss\n")
    np.testing.assert_allclose(_csv_values(result["csv"]), _csv_values(reference["csv"]), 1e-5)
    saved, expected = _saved_models(ckpt), _saved_models(tmp_path / "ref")
    assert sorted(saved) == sorted(expected) == [f"ckpt-{e:02d}.keras" for e in (1, 3, 4, 5, 6)]
    for name, arrays in expected.items():
        assert saved[name].keys() == arrays.keys()
        for key, value in arrays.items():
            np.testing.assert_allclose(saved[name][key], value, atol=1e-5, err_msg=name + key)
    for name in planted:
        assert (ckpt / name).is_dir()


def _csv_values(text):
    """The numbers of a CSVLogger file (NA as NaN), its header once and first."""
    lines = text.strip().splitlines()
    assert lines.count(lines[0]) == 1 and lines[0].startswith("epoch,")
    return np.array(
        [[float("nan" if v == "NA" else v) for v in line.split(",")] for line in lines[1:]]
    )


@pytest.mark.mpi
def test_a_checkpoint_of_another_run_or_user_is_refused(tmp_path):
    """One job, 2 ranks: a genuine checkpoint copied into a directory anyone
    can write, another user's, a link, or with its epoch forged to 10^18 (its
    manifest made to match) is refused before training, naming why; run B
    (another learning rate and data) is refused run A's checkpoint, naming
    both differences, unless TD_RESUME=force (resumes) or fresh (sets A's
    aside, trains afresh; its own checkpoints then resume). Run A resumes its
    own (the control). The last refusal, not caught, ends the job."""
    job = run(
        ["-m", "transparent_dist", str(JOBS / "preemptible_refusals.py"), str(tmp_path)],
        ranks=2,
        timeout=300,
    )
    assert job.returncode == 1 and "finished" not in job.stdout
    assert f"refusing the checkpoint directory {tmp_path}/loose" in job.stderr
    found = json.loads((tmp_path / "refusals.json").read_text())
    results, trained = found["results"], found["trained"]
    assert "it is writable by group or others (mode 777)" in results["loose"]
    assert "it is a symbolic link" in results["symlink"]
    if os.getuid() == 0:
        assert "it is owned by uid 65534, not by this user" in results["other_owner"]
    assert (
        f"{tmp_path}/forged/ckpt-000000000010/meta.json: epoch=1000000000000000000 is not a "
        "whole number from 0 to 2 (this fit has epochs=2)"
    ) in results["forged_epoch"]
    assert results["same"] == "" and trained["same"] == 5
    other = results["other_run"]
    assert f"the checkpoint {tmp_path}/a/ckpt-000000000010 is of another run: " in other
    assert "compile.optimizer.config.learning_rate is 0.01 in the checkpoint, 0.05 in" in other
    assert "data.x[0].rows_sha256 is" in other and "Resume it anyway with TD_RESUME=force" in other
    assert results["force"] == "" and trained["force"] == 5
    assert "resuming it anyway (TD_RESUME=force)" in job.stderr
    assert results["fresh"] == "" and trained["fresh"] == 10
    assert "TD_RESUME=fresh: training starts afresh, the checkpoints there moved to" in job.stderr
    superseded = [n for n in results["fresh_listing"] if n.startswith("superseded-")]
    assert len(superseded) == 1
    assert sorted(os.listdir(tmp_path / "fresh" / superseded[0])) == ["ckpt-000000000005"]
    assert results["fresh_again"] == "" and trained["fresh_again"] == 0  # its own: resumed
