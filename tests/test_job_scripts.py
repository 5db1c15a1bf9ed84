"""The batch-job examples (examples/slurm, examples/pbs) keep the README's
rules, and the PBS script's own logic works: run with stand-ins for qstat,
qsub and PALS mpiexec (no PBS, no MPI), its timer asks the ranks for a
checkpoint before the walltime and it submits the next job on status 75."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

SLURM = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
PBS = ROOT / "examples" / "pbs" / "train_polaris.pbs"


def _commands(text: str, name: str) -> list[str]:
    """The `name` command lines of a shell script (continuations joined,
    comments left out)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(name + " ")]


def test_there_are_examples_for_cpu_and_gpu_nodes():
    assert [p.name for p in SLURM] == ["train_cpu.sbatch", "train_gpu_perlmutter.sbatch"]
    assert PBS.exists()


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_sbatch_examples_keep_the_readme_rules(script):
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    directives = [
        line.split("#", 2)[1].split()[1:]
        for line in text.splitlines()
        if line.startswith("#SBATCH ")
    ]
    flat = [word for words in directives for word in words]
    for wanted in ("--requeue", "--open-mode=append", "--signal=USR1@120", "-C", "-q"):
        assert wanted in flat, f"{script.name}: no #SBATCH {wanted}"
    assert "##SBATCH -A" in text  # the project, a placeholder that does not stop sbatch
    sruns = _commands(text, "srun")
    assert len(sruns) == 1, sruns
    # The mpich wheel needs PMI-2 (--mpi=none: a world per task); a rank
    # that dies must end the job; srun is told the CPUs per task itself.
    for option in (
        "--mpi=pmi2",
        "--kill-on-bad-exit=1",
        '-c "$SLURM_CPUS_PER_TASK"',
        "--cpu-bind=cores",
    ):
        assert option in sruns[0], f"{script.name}: srun without {option}"
    # The Cray MPICH variant is there, commented, without --mpi=pmi2.
    assert "# srun --kill-on-bad-exit=1" in text
    assert re.search(r"^export TD_CHECKPOINT_DIR=.*/\$EXPERIMENT$", text, re.M)
    assert re.search(r'if \[ "\$status" -eq 75 \]; then\n.*\n\s+scontrol requeue', text)


def _stand_ins(tmp_path: Path, walltime: str, rank_seconds: int) -> dict[str, str]:
    """qstat, qsub and mpiexec stand-ins on PATH; the ranks they start are
    named as the real ones (`python -m transparent_dist ...`) and exit 75 on
    SIGUSR1, as the plugin's do once the checkpoint is written."""
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake" / "transparent_dist"
    bin_dir.mkdir()
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
        f"time.sleep({rank_seconds})\n"
    )
    stubs = {
        "qstat": f"""printf '    Account_Name = MyProj\\n    Resource_List.walltime = {walltime}\\n'""",
        "qsub": f'echo "$*" >> {tmp_path}/qsub.log',
        "mpiexec": f"""echo "$*" >> {tmp_path}/mpiexec.log
while [ "$1" != python ]; do shift; done; shift
pids=()
for r in 0 1; do
    PYTHONPATH={tmp_path / "fake"} bash -c 'exec -a python {sys.executable} "$@"' _ "$@" &
    pids+=($!)
done
status=0
for p in "${{pids[@]}}"; do wait "$p"; s=$?; echo "rank $s" >> {tmp_path}/mpiexec.log
    [ $s -gt $status ] && status=$s; done
exit $status""",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    nodes = tmp_path / "nodefile"
    nodes.write_text("node1\nnode2\n")
    work = tmp_path / "work" / "examples" / "pbs"
    work.mkdir(parents=True)
    shutil.copy(PBS, work)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "USER": getpass.getuser(),
        "PBS_O_WORKDIR": str(tmp_path / "work"),
        "PBS_NODEFILE": str(nodes),
        "PBS_JOBID": "123.polaris",
    }


@pytest.mark.skipif(shutil.which("pkill") is None, reason="no pkill (procps)")
@pytest.mark.parametrize(
    "walltime, rank_seconds, status",
    [("00:05:02", 30, 75), ("01:00:00", 2, 0)],  # signalled at 2 s; the control: never
    ids=["checkpoint", "control"],
)
def test_pbs_example_checkpoints_before_the_walltime_and_resubmits(
    tmp_path, walltime, rank_seconds, status
):
    env = _stand_ins(tmp_path, walltime, rank_seconds)
    start = time.monotonic()
    # A session (and process group) of its own: whatever the job leaves
    # running is found after it, and ended by its group id, not by name.
    job = subprocess.Popen(
        ["bash", "examples/pbs/train_polaris.pbs"],
        cwd=env["PBS_O_WORKDIR"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = job.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail("the job, or a process it left holding its output, ran past 45 s")
        took = time.monotonic() - start
        assert job.returncode == status, stdout + stderr
        launched = (tmp_path / "mpiexec.log").read_text().splitlines()
        assert launched[0] == (
            "-n 8 --ppn 4 --depth 8 --cpu-bind depth python -m transparent_dist train.py --epochs 50"
        )
        assert launched[1:] == [f"rank {status}"] * 2
        qsub = tmp_path / "qsub.log"
        if status == 75:
            assert took < 15  # 2 s to the signal, not the ranks' 30
            assert qsub.read_text() == "-A MyProj examples/pbs/train_polaris.pbs\n"
            assert "submitting the next job" in stdout
        else:
            assert not qsub.exists()
        # The timer is stopped with the job: no sleep of the walltime's
        # length, nor a rank, is left behind.
        time.sleep(0.5)
        ps = subprocess.run(
            ["ps", "-s", str(job.pid), "-o", "stat=,args="], capture_output=True, text=True
        )
        alive = [line for line in ps.stdout.splitlines() if not line.lstrip().startswith("Z")]
        assert alive == [], "processes outlived the job"  # (zombies wait for init's reaping)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
