"""tdrun, the doctor, and device / thread placement."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
from conftest import JOBS, ROOT, job_env, load_ranks, run

from transparent_dist.core import world
from transparent_dist.runtime import launcher
from transparent_dist.tf import placement

TDRUN = str(Path(sys.executable).parent / "tdrun")


def test_dry_run_uses_the_venv_mpiexec(tmp_path):
    job = run(
        [TDRUN, "-n", "3", "--hosts", "a,b", "--dry-run", "train.py", "--epochs", "2"],
        env=job_env(),
    )
    assert job.returncode == 0
    words = job.stdout.split()
    # The venv's bin holds symlinks to the interpreter: compare unresolved.
    venv_bin = Path(os.path.abspath(Path(sys.executable).parent))
    assert words[0] == str(venv_bin / "mpiexec")
    assert words[1:5] == ["-n", "3", "-hosts", "a,b"]
    assert Path(words[5]).parent == venv_bin
    assert words[6:] == ["-m", "transparent_dist", "train.py", "--epochs", "2"]


def test_inside_slurm_it_uses_srun(tmp_path):
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = job_env(SLURM_JOB_ID="42", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    job = run([TDRUN, "-n", "2", "--dry-run", "-m", "pkg.train"], env=env)
    assert job.stdout.split()[:4] == [str(fake), "-n", "2", "--mpi=pmi2"]
    assert job.stdout.split()[-4:] == ["-m", "transparent_dist", "-m", "pkg.train"]
    assert launcher.find_launcher("auto", {"PATH": str(tmp_path)})[0] == "mpiexec"  # no job


@pytest.mark.mpi
def test_tdrun_runs_the_script_on_n_ranks(tmp_path):
    job = run([TDRUN, "-n", "2", str(JOBS / "show_context.py"), str(tmp_path), "0"], env=job_env())
    assert job.returncode == 0
    for context in load_ranks(tmp_path, "context", 2):
        assert context["argv"] == [str(JOBS / "show_context.py"), str(tmp_path), "0"]


@pytest.mark.mpi
def test_doctor_inside_a_job():
    env = job_env()
    env.pop("TF_NUM_INTRAOP_THREADS")  # let the placement choose
    job = run(["-m", "transparent_dist", "doctor"], ranks=2, env=env).check()
    for text in (
        "MPI: MPICH",
        "world: 2 rank(s)",
        "patches that apply: keras3",
        "ranks per node",
        "rank 1 on",
        "allreduce of 8 MB float32",
    ):
        assert text in job.stdout, job.stdout
    # The thread split, for real: 2 ranks on this node share its cores.
    cores = os.cpu_count()
    assert f"intra-op threads {max(1, cores // 2)}" in job.stdout


def test_doctor_on_a_login_node_names_the_mpi_a_job_would_use():
    job = run(["-m", "transparent_dist", "doctor"], env=job_env()).check()
    assert "MPI: not started" in job.stdout
    assert "library a job would use: MPICH" in job.stdout, job.stdout
    assert "launcher and library: match (MPICH)" in job.stdout, job.stdout


def test_open_mpi_launchers_get_their_own_options(tmp_path, monkeypatch):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (Open MPI) 5.0.11'\n")
    fake.chmod(0o755)
    launcher.flavour.cache_clear()
    assert launcher.flavour(str(fake)) == "Open MPI"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    command = launcher.build_command("mpiexec", str(fake), 64, "a,b", [], ["train.py"])
    assert command[:6] == [
        str(fake),
        "-n",
        "64",
        "--oversubscribe",
        "--allow-run-as-root",
        "--host",
    ]
    assert command[6] == "a,b"
    assert launcher.family_of_library("Open MPI v5.0.11, package: Open MPI") == "Open MPI"
    assert launcher.family_of_library("MPICH Version:      5.0.2") == "MPICH"


def test_gpu_choice_with_a_stubbed_device_list(monkeypatch):
    assert placement.gpu_for(local_rank=5, local_size=8, gpus=4) == 1
    assert placement.gpu_for(local_rank=0, local_size=1, gpus=0) is None
    assert placement.threads_for(cores=64, local_size=4) == 16
    assert placement.threads_for(cores=2, local_size=4) == 1
    calls = []
    gpus = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(4)]
    config = types.SimpleNamespace(
        list_physical_devices=lambda kind: gpus if kind == "GPU" else [],
        set_visible_devices=lambda device, kind: calls.append(("visible", device.name)),
        experimental=types.SimpleNamespace(
            set_memory_growth=lambda device, on: calls.append(("growth", device.name, on))
        ),
    )
    monkeypatch.setattr(world, "_WORLD", world.World(rank=6, size=8, local_rank=2, local_size=4))
    chosen = placement.apply(types.SimpleNamespace(config=config))
    assert chosen == {"gpu": "/physical_device:GPU:2"}
    assert calls == [
        ("visible", "/physical_device:GPU:2"),
        ("growth", "/physical_device:GPU:2", True),
    ]


def test_doctor_without_mpi():
    job = run(["-m", "transparent_dist", "doctor"]).check()
    assert "MPI: not started" in job.stdout and "world: 1 rank(s)" in job.stdout
    assert json.dumps(job.stdout)  # plain text
    assert ROOT.exists()
