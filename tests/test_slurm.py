"""A real Slurm run: a one-node cluster on this machine, an unmodified Keras
script submitted with sbatch and started by tdrun (srun --mpi=pmi2 -n 2)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import JOBS, background, background_result, job_env, load_ranks

DAEMONS = [shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "munged")]
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(
        not all(DAEMONS) or os.geteuid() != 0,
        reason="Slurm is not installed (apt-get install slurm-wlm munge; .ci/run does it) "
        "or this is not root (slurmd needs root)",
    ),
]

# The one-process reference (nothing times it) starts with the session.
REFERENCE = background(
    "slurm-reference",
    __file__,
    lambda out: [str(JOBS / "tiny_plain.py"), str(out), "reference", "40"],
)


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


def _sbatch_and_wait(script: Path, env: dict, timeout: float = 300) -> str:
    """Submits `script`; returns `scontrol show job` once the job has ended.
    (`sbatch --wait` polls at growing intervals: it returned ~30 s after a
    12 s job had ended.)"""
    submitted = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, check=True
    )
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True
        ).stdout
        if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_ME)", state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {state}")


def test_sbatch_tdrun_trains_on_two_ranks(cluster, tmp_path):
    env, directory = cluster
    tdrun = Path(sys.executable).parent / "tdrun"
    script = tmp_path / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --output={tmp_path}/job.out
{tdrun} -n 2 {JOBS / "tiny_plain.py"} {tmp_path} slurm 20
""")
    state = _sbatch_and_wait(script, env)
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + output[-3000:]
    background_result("slurm-reference").check()
    reference = np.asarray(load_ranks(REFERENCE, "reference", 1)[0]["weights"])
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
