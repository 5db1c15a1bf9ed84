"""Batch jobs never hang: every failure ends the job promptly and says why;
SIGTERM checkpoints, and the rerun resumes to the same weights."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import JOBS, PYTHON, _mpiexec, job_env, run

from transparent_dist.core import checkpoint, config, preemption

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
        # Calls that differ between ranks: named at the first one, never paired up.
        (
            "fit_twice",
            30,
            ["rank 0: fit #2 at faults.py:", "rank 1: the end of the script (after fit #1"],
        ),
        (
            "evaluate_vs_fit",
            30,
            ["rank 0: fit #1 at faults.py:", "rank 1: evaluate #1 at faults.py:"],
        ),
        (
            "steps_on_one_rank",
            30,
            ["rank 0: fit #1 at faults.py:", "with steps_per_epoch=5", "steps_per_epoch=None"],
        ),
        (
            "adamw_on_one_rank",
            30,
            ["rank 0 has optimizer.class_name='Adam'", "rank 1 has optimizer.class_name='AdamW'"],
        ),
        ("loss_on_one_rank", 30, ["rank 0 has loss='mse' where rank 1 has loss='mae'"]),
        # A signal to one rank ends the job, with a shell's status for it.
        ("sigint", 30, ["rank 1 of 2 was interrupted (SIGINT, KeyboardInterrupt)"]),
        ("sigterm", 30, ["rank 1 of 2 received SIGTERM; ending all ranks of the job"]),
    ],
)
def test_failure_ends_the_job_promptly_with_the_reason(mode, limit, expected, tmp_path):
    marker = str(tmp_path / mode)
    job = run(
        ["-m", "transparent_dist", FAULTS, mode],
        ranks=2,
        timeout=120,
        env=job_env(FAULT_OUT=marker),
    )
    expected_status = {"sigint": 130, "sigterm": 143}.get(mode)
    assert job.returncode != 0 and job.returncode == (expected_status or job.returncode)
    assert job.seconds < limit, job.seconds
    for text in expected:
        assert text in job.stdout + job.stderr, (text, job.stderr[-3000:])
    assert "finished" not in job.stdout
    assert not _leftovers(marker)
    if mode == "mismatched_model":
        assert job.stderr.count("the ranks disagree on the model") == 1  # said once, by rank 0


def _leftovers(marker: str, grace: float = 10.0) -> list[int]:
    """Processes of a job still alive `grace` seconds after the launcher
    returned (each rank wrote its pid to MARKER-pid<r>)."""
    deadline = time.monotonic() + grace
    while (alive := _alive(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _alive(marker: str) -> list[int]:
    alive = []
    for path in glob.glob(marker + "-pid*"):
        pid = int(open(path).read())
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone
        if state != "Z":  # a zombie has ended; only its parent has not reaped it
            alive.append(pid)
    return alive


def test_a_rank_that_stops_training_stops_every_rank(tmp_path):
    """model.stop_training set on one rank (EarlyStopping on its own numbers
    at an epoch's end; a time budget mid-epoch): every rank stops at the same
    step, said once, instead of one rank waiting in the exchange forever."""
    marker = str(tmp_path / "stop")
    job = run(
        ["-m", "transparent_dist", FAULTS, "stop_one_rank"],
        ranks=2,
        timeout=120,
        env=job_env(FAULT_OUT=marker),
    ).check()
    assert job.stderr.count("rank(s) 1 stopped training at the end of epoch 1") == 1
    assert job.stderr.count("rank(s) 1 stopped training at step 4") == 1
    # 2 epochs of 20 steps, then 1 epoch, then 4 steps: on both ranks.
    for rank in (0, 1):
        assert open(f"{marker}-rank{rank}").read().split() == ["[1,", "1]", "64"]


def test_sigterm_to_a_rank_blocked_in_a_collective_ends_the_job(tmp_path):
    """Rank 1 is busy in a callback for 120 s; rank 0 waits in a collective,
    where Python cannot run its signal handler: the listener thread ends the
    job with 143 a few seconds after the SIGTERM."""
    marker = str(tmp_path / "blocked")
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", FAULTS, "sleep_long"]
    job = subprocess.Popen(
        command, env=job_env(FAULT_OUT=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(tmp_path / "blocked-sleeping")
    time.sleep(1)
    os.kill(int(open(marker + "-pid0").read()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143
    assert time.monotonic() - sent < 15
    text = stderr.decode()
    assert "rank 0: the main thread did not act on SIGTERM within 3 s; it is here" in text
    assert "in any_flags" in text  # the collective it waits in
    assert not _leftovers(marker)


def test_a_stopped_rank_0_is_named_by_the_other_watcher_and_the_job_ends(tmp_path):
    """SIGSTOP on rank 0 (the first watcher) mid-epoch: the last rank names
    it, prints its own stack, and ends the job after TD_STALL_ABORT."""
    marker = str(tmp_path / "stopped")
    job = run(
        ["-m", "transparent_dist", FAULTS, "stop_rank0"],
        ranks=2,
        timeout=120,
        env=job_env(TD_STALL_WARN="2", TD_STALL_ABORT="6", FAULT_OUT=marker),
    )
    assert job.returncode != 0
    assert job.seconds < 40, job.seconds
    assert "for rank(s) 0, which have not arrived (rank 0 last entered collective" in job.stderr
    assert "stack of rank 1 (waiting; in fit #1 at faults.py:" in job.stderr
    assert "rank(s) 0 did not reach collective" in job.stderr
    assert "finished" not in job.stdout
    assert not _leftovers(marker)


def test_stalled_rank_is_named_and_optionally_aborted():
    job = run(
        ["-m", "transparent_dist", FAULTS, "stall"],
        ranks=3,
        timeout=120,
        env=job_env(TD_STALL_WARN="2"),
    ).check()
    assert "rank(s) 1, which have not arrived" in job.stderr
    # Where the late rank is, and where the others wait.
    assert "stack of rank 1 (late; in fit #1 at faults.py:" in job.stderr
    assert "[rank 1]     time.sleep(6)" in job.stderr
    assert "stack of rank 0 (waiting; in fit #1" in job.stderr
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


def _start(out, tag, ranks=2, **env):
    command = [_mpiexec(), "-n", str(ranks), PYTHON, "-m", "transparent_dist", PREEMPTIBLE]
    command += [str(out), tag]
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
    (tmp_path / "ckpt-000000000001" / "manifest.json").unlink()  # an older format, now broken
    os.truncate(tmp_path / "ckpt-000000000001" / "arrays.npz", 10)
    with pytest.raises(checkpoint.CheckpointError, match="arrays.npz is not a readable array"):
        checkpoint.load(str(tmp_path / "ckpt-000000000001"))
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


def test_sigterm_after_fit_ends_the_job_as_without_the_plugin(tmp_path):
    """The checkpoint handler is gone once fit returns: SIGTERM in the
    script's next phase ends the job with 143 at once, writing nothing."""
    ckpt = tmp_path / "ckpt"
    job = _start(tmp_path, "run", TD_CHECKPOINT_DIR=str(ckpt), AFTER_FIT="1")
    _wait_for(tmp_path / "fit-done")
    os.kill(int((tmp_path / "pid-rank1").read_text()), signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr[-3000:]
    assert time.monotonic() - sent < 15
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
    assert "an earlier build failed" in results["second_failure"]
    assert "no-such-compiler" in results["retry"]  # `build` tries again
    assert not [name for name in results["leftovers"] if name.endswith(".so")]


# ------------------------------------------------ preemption beyond Keras 3's fit

KINDS = str(JOBS / "preemptible_kinds.py")


@pytest.mark.parametrize("kind", ["tf_keras", "loop", "tf1"])
def test_every_kind_of_script_survives_the_walltime(tmp_path, kind):
    """tf_keras's fit, a tf.function GradientTape loop and a TF1 session
    loop: SIGTERM mid-run -> a checkpoint and status 75 -> the same
    command again ends with the weights of the uninterrupted run."""
    full, out, ckpt = tmp_path / "full", tmp_path / "run", tmp_path / "ckpt"
    full.mkdir()
    out.mkdir()
    run(
        ["-m", "transparent_dist", KINDS, str(full), "full"], ranks=2, env=job_env(KIND=kind)
    ).check()
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", KINDS, str(out), "run"]
    env = job_env(KIND=kind, TD_CHECKPOINT_DIR=str(ckpt))
    job = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "progress-rank0", lines=40)  # in the second of three epochs
    for rank in (0, 1):
        os.kill(int((out / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == preemption.PREEMPTED_STATUS, stderr[-3000:]
    meta = checkpoint.peek(str(ckpt))
    assert 40 <= meta["global_step"] < 90
    assert not (out / "run-rank0.json").exists()
    resumed = run(["-m", "transparent_dist", KINDS, str(out), "run"], ranks=2, env=env).check()
    assert f"resumed from {ckpt}" in resumed.stderr
    assert "ran out of data" not in resumed.stderr
    for rank in (0, 1):
        np.testing.assert_allclose(_weights(out, "run", rank), _weights(full, "full"), atol=1e-5)
