"""A real Slurm run: a one-node cluster on this machine, an unmodified Keras
script submitted with sbatch and started by tdrun (srun --mpi=pmi2 -n 2)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import JOBS, job_env, load_ranks, run

DAEMONS = [shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "munged")]
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(
        not all(DAEMONS) or os.geteuid() != 0,
        reason="Slurm is not installed (apt-get install slurm-wlm munge; .ci/run does it) "
        "or this is not root (slurmd needs root)",
    ),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_running() -> bool:
    probe = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
    return probe.returncode == 0


def _start_munge() -> None:
    if _munge_running():
        return
    for path in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(path, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=False)
    if not _munge_running():
        subprocess.run(["/usr/sbin/munged", "--force"], check=False)
    assert _munge_running(), "munged did not start"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    for sub in ("spool", "state", "log"):
        (directory / sub).mkdir()
    conf = directory / "slurm.conf"
    conf.write_text(f"""ClusterName=tdtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPort={_port()}
SlurmdPort={_port()}
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = job_env(SLURM_CONF=str(conf))
    _start_munge()
    subprocess.run(["slurmctld"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    deadline = time.monotonic() + 60
    while (
        "idle"
        not in subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
        ).stdout
    ):
        assert time.monotonic() < deadline, (directory / "log" / "slurmctld.log").read_text()[
            -2000:
        ]
        time.sleep(0.5)
    yield env, directory
    subprocess.run(["scontrol", "shutdown"], env=env, check=False)
    pid = directory / "slurmd.pid"
    if pid.exists():
        subprocess.run(["kill", pid.read_text().strip()], check=False)


def test_sbatch_tdrun_trains_on_two_ranks(cluster, tmp_path):
    env, directory = cluster
    run([str(JOBS / "tiny_plain.py"), str(tmp_path), "reference", "40"]).check()
    tdrun = Path(sys.executable).parent / "tdrun"
    script = tmp_path / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --output={tmp_path}/job.out
{tdrun} -n 2 {JOBS / "tiny_plain.py"} {tmp_path} slurm 20
""")
    job = subprocess.run(
        ["sbatch", "--wait", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert job.returncode == 0, job.stderr + output[-3000:]
    reference = np.asarray(load_ranks(tmp_path, "reference", 1)[0]["weights"])
    ranks = [np.asarray(r["weights"]) for r in load_ranks(tmp_path, "slurm", 2)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    np.testing.assert_allclose(ranks[0], reference, atol=1e-5)  # 2 ranks x 20 = 1 x 40


def test_srun_without_pmi_is_a_clear_error(cluster):
    env, _ = cluster
    job = subprocess.run(
        ["srun", "-n", "2", "--mpi=none", sys.executable, "-c", "import transparent_dist"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode != 0
    assert "started as 2 tasks, but MPI sees a world of 1" in job.stderr
