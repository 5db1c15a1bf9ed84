"""Every way a rank can leave, and settings that differ between ranks: the
job ends within seconds, naming the rank and what it did; signals that come
late still give the documented status (README: "Batch jobs")."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    JOBS,
    PYTHON,
    Finished,
    _mpiexec,
    job_env,
    open_mpi,
    outcome,
    run,
    side_by_side,
)

pytestmark = pytest.mark.mpi

LEAVE = str(JOBS / "leave.py")
LATE_SIGNALS = str(JOBS / "late_signals.py")
ENDED = "reached the end of the script"
NOT_SAME = "the ranks are not making the same calls in the same order"

# (how, where, ranks, leaving rank, form) -> the words the job must end with.
# Rows are a diagonal of the how x where matrix (README: the rest was run by
# hand). form: "cli" is `python -m transparent_dist leave.py`, "import" is
# `python leave.py` with its `import transparent_dist` line.
CASES = {
    ("exit0", "step", 2, 1, "cli"): [f"rank(s) 1 {ENDED}", "rank(s) 0 wait in collective #"],
    ("exit3", "step", 3, 0, "import"): [f"rank(s) 0 {ENDED}", "rank(s) 1, 2 wait in collective"],
    ("finalize", "step", 2, 1, "cli"): [f"rank(s) 1 {ENDED}", "MPI.Finalize()", "of fit #1"],
    ("exit0", "between", 3, 2, "import"): [NOT_SAME, "rank 2: the end of the script (after fit"],
    ("exit0", "predict", 2, 1, "cli"): [NOT_SAME, "rank 0: predict #1", "rank 1: the end of"],
    ("exit0", "loop", 2, 1, "import"): [f"rank(s) 1 {ENDED}", "the script's own training loop"],
    ("raise", "before", 2, 1, "import"): ["RuntimeError: rank 1 gives up", "rank 1 of 2 failed"],
}


def _leave(case) -> Finished:
    how, where, ranks, leaver, form = case
    return run(
        [LEAVE] if form == "import" else ["-m", "transparent_dist", LEAVE],
        ranks=ranks,
        timeout=120,
        env=job_env(LEAVE_HOW=how, LEAVE_WHERE=where, LEAVE_RANK=str(leaver)),
    )


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """This module's jobs, two at a time (conftest.side_by_side): most of
    each one's time is a rank waiting for the watchdog or a signal."""
    drivers = {case: functools.partial(_leave, case) for case in CASES}
    drivers["configure"] = _configure_on_one_rank
    for name, driver in (("two_sigterms", _two_sigterms), ("sigusr1", _sigusr1_after_fit)):
        drivers[name] = functools.partial(driver, tmp_path_factory.mktemp(name))
    return side_by_side(drivers)


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: "-".join(map(str, c)))
def test_a_rank_that_leaves_early_ends_the_job_naming_it(jobs, case):
    how, where, ranks, leaver, form = case
    job = outcome(jobs[case])
    assert job.returncode != 0, job.stderr[-3000:]
    for words in CASES[case]:
        assert words in job.stderr, job.stderr[-3000:]
    # Starting TensorFlow takes ~5 s per rank here (twice that beside the
    # module's other job); the end comes seconds after.
    assert job.seconds < 60
    # Said once at the start: where the other ranks' output went, and
    # (where ranks outnumber cores, as 3 do on the 2-core test machines) why it crawls.
    assert job.stderr.count("only rank 0 prints (the others' standard output is hidden") == 1
    if ranks > (os.cpu_count() or 1):
        assert job.stderr.count(f"{ranks} ranks share this node's") == 1


def test_finalizing_mpi_itself_then_writing_results_works(tmp_path):
    """A script that calls MPI.Finalize() at its end and writes afterwards:
    the watchdog's threads stop before MPI goes (they used to crash it)."""
    job = run(
        ["-m", "transparent_dist", LEAVE],
        ranks=2,
        timeout=120,
        env=job_env(
            LEAVE_HOW="finalize", LEAVE_WHERE="end", LEAVE_RANK="-1", RESULTS=str(tmp_path)
        ),
    ).check()
    assert job.returncode == 0
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "written after MPI.Finalize\n"
    assert list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    # Python logging below WARNING follows the stdout rule; warnings do not.
    assert "INFO Initialized rank 0" in job.stderr
    assert "Initialized rank 1" not in job.stderr
    assert "WARNING rank 0 warns" in job.stderr and "WARNING rank 1 warns" in job.stderr


def _one_rank_with(name: str, value: str, code: str) -> list[str]:
    """An MPMD command line: rank 0 with `name=value`, rank 1 without."""
    mpiexec = _mpiexec()
    if open_mpi():
        first = [mpiexec, "-n", "1", "-x", f"{name}={value}"]
    else:
        first = [mpiexec, "-n", "1", "-env", name, value]
    return [*first, PYTHON, "-c", code, ":", "-n", "1", PYTHON, "-c", code]


@pytest.mark.parametrize(
    "name,value",
    [("TD_BATCH_SIZE", "global"), ("TD_NATIVE", "off"), ("TD_CHECKPOINT_DIR", "/tmp/x")],
)
def test_a_setting_that_differs_between_ranks_is_named_at_start(name, value):
    job = run(_one_rank_with(name, value, "import transparent_dist"), timeout=60)
    assert job.returncode == 2  # as the message says, not the end check's 1
    assert "the ranks disagree on settings that must be the same on every rank" in job.stderr
    assert "not making the same calls" not in job.stderr
    assert f"rank 0 has {name}={value!r} where rank 1 has {name}=" in job.stderr
    assert job.seconds < 20


def _configure_on_one_rank() -> Finished:
    code = (
        "import transparent_dist, keras, numpy as np\n"
        "if transparent_dist.rank() == 1: transparent_dist.configure(lr_scaling='linear')\n"
        "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "m.compile('sgd', 'mse')\n"
        "m.fit(np.ones((8, 2)), np.ones((8, 1)), verbose=0)\n"
    )
    return run(["-c", code], ranks=2, timeout=60)


def test_configure_on_one_rank_is_named_at_the_next_fit(jobs):
    job = outcome(jobs["configure"])
    assert job.returncode != 0
    assert NOT_SAME in job.stderr
    assert "TD_LR_SCALING='none'" in job.stderr and "TD_LR_SCALING='linear'" in job.stderr


def _start_late(out, **env):
    command = [_mpiexec(), "-n", "2", PYTHON, "-m", "transparent_dist", LATE_SIGNALS, str(out)]
    return subprocess.Popen(
        command, env=job_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, timeout=90):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _signal_ranks(out, number):
    for rank in (0, 1):
        os.kill(int((out / f"pid-rank{rank}").read_text()), number)


def _two_sigterms(out) -> tuple[int, str, Path]:
    job = _start_late(out, TD_CHECKPOINT_DIR=str(out / "ckpt"))
    _wait_for(out / "in-fit")
    _signal_ranks(out, signal.SIGTERM)
    time.sleep(0.6)
    _signal_ranks(out, signal.SIGTERM)
    _, stderr = job.communicate(timeout=90)
    return job.returncode, stderr, out


def test_two_sigterms_still_end_with_the_requeue_status(jobs):
    """Slurm's SIGTERM and a user's `scancel --signal=TERM` 0.6 s apart: the
    checkpoint is written and the job ends with 75, not 15 / 143."""
    returncode, stderr, out = outcome(jobs["two_sigterms"])
    assert returncode == 75, stderr[-3000:]
    assert "exiting with status 75" in stderr
    assert (out / "ckpt" / "latest").exists()


def _sigusr1_after_fit(out) -> tuple[int, str, Path]:
    # No slow steps: the signal comes after fit.
    job = _start_late(out, TD_CHECKPOINT_DIR=str(out / "ckpt"), SLOW_STEPS="0")
    _wait_for(out / "fit-done")
    _signal_ranks(out, signal.SIGUSR1)
    _, stderr = job.communicate(timeout=90)
    return job.returncode, stderr, out


def test_sigusr1_after_fit_is_said_and_the_exports_are_written(jobs):
    returncode, stderr, out = outcome(jobs["sigusr1"])
    assert returncode == 0, stderr[-3000:]
    assert "SIGUSR1 received outside a fit that checkpoints" in stderr
    assert float((out / "export-rank0.txt").read_text()) >= 0
