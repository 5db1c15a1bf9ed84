"""tdrun's command line as a batch user types it (in-process: nothing is
launched): the rank count from the allocation, `-np`, and options that are
not ours refused before anything starts."""

from __future__ import annotations

import pytest

from transparent_dist.runtime import launcher


def _dry(capsys, argv, monkeypatch=None, **environ):
    if monkeypatch is not None:
        for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "PBS_NODEFILE", "HYDRA_HOST_FILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
    assert launcher.main(["--launcher", "mpiexec", "--dry-run", *argv]) == 0
    return capsys.readouterr()


def test_the_rank_count_comes_from_the_allocation(tmp_path):
    assert launcher.allocation_ranks({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == (
        8,
        "SLURM_NTASKS",
    )
    slurm_nodes = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}
    assert launcher.allocation_ranks(slurm_nodes)[0] == 8
    assert launcher.allocation_ranks({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3"})[0] == 3
    pbs = tmp_path / "nodes"
    pbs.write_text("x3000c0s1b0n0\n" * 4 + "x3000c0s1b1n0\n" * 4)
    assert launcher.allocation_ranks({"PBS_NODEFILE": str(pbs)}) == (8, f"PBS_NODEFILE ({pbs})")
    hydra = tmp_path / "hosts"
    hydra.write_text("# two nodes\nnode1:4\nnode2:2\n")
    assert launcher.allocation_ranks({"HYDRA_HOST_FILE": str(hydra)})[0] == 6
    ompi = tmp_path / "ompi"
    ompi.write_text("node1 slots=3\nnode2 slots=3\n")
    assert launcher.allocation_ranks({"PRTE_MCA_prte_default_hostfile": str(ompi)})[0] == 6
    assert launcher.allocation_ranks({}) is None


def test_tdrun_without_n_starts_what_the_allocation_has(capsys, monkeypatch):
    out = _dry(capsys, ["train.py"], monkeypatch, SLURM_JOB_ID="42", SLURM_NTASKS="8")
    assert out.out.split()[1:3] == ["-n", "8"]
    assert "tdrun: 8 ranks, from SLURM_NTASKS (-n to choose)" in out.err
    out = _dry(capsys, ["-n", "2", "train.py"], monkeypatch, SLURM_JOB_ID="42", SLURM_NTASKS="8")
    assert out.out.split()[1:3] == ["-n", "2"]
    assert _dry(capsys, ["train.py"], monkeypatch).out.split()[1:3] == ["-n", "1"]


def test_np_is_taken_as_mpirun_takes_it(capsys, monkeypatch):
    out = _dry(capsys, ["-np", "3", "train.py", "--epochs", "2"], monkeypatch).out.split()
    assert out[1:3] == ["-n", "3"]
    assert out[-4:] == ["transparent_dist", "train.py", "--epochs", "2"]


def test_an_option_that_is_not_ours_is_refused_before_launching(capsys):
    with pytest.raises(SystemExit) as stopped:
        launcher.main(["--dry-run", "--epochs", "2", "train.py"])
    assert stopped.value.code == 2
    assert "--epochs is not an option here; options for the script go after its name" in (
        capsys.readouterr().err
    )
    # The script's own options, -m and -c are the script's, wherever they are.
    assert launcher.split_target(["-n", "2", "train.py", "-np", "5"]) == (
        ["-n", "2"],
        ["train.py", "-np", "5"],
    )
    assert launcher.split_target(["-m", "pkg.train", "--x"]) == ([], ["-m", "pkg.train", "--x"])
