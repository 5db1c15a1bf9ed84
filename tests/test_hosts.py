"""More than one host, for real: two "nodes" on this machine, each a
network namespace with its own hostname, joined by veth links; MPICH's
Hydra starts each node's ranks in its namespace and they talk TCP
(`netns_cluster`). Skipped, with the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import JOBS, PYTHON, background, background_result, job_env, load_ranks, run
from netns_cluster import Cluster

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(Cluster.unavailable() is not None, reason=str(Cluster.unavailable())),
]

PREEMPTIBLE = str(JOBS / "preemptible.py")
# One global batch at any rank count, no dropout: numbers independent of N.
GLOBAL = {"TD_BATCH_SIZE": "global", "BATCH": "48", "DROPOUT": "0"}

# The one-process references (nothing times them) start with the session:
# 4 ranks x 12 and 1 x 48; the checkpointed job's uninterrupted run at its
# global batch of 48 (2 or 4 ranks or one process: the same numbers).
REFERENCE = background(
    "hosts-reference",
    __file__,
    lambda out: [str(JOBS / "tiny_plain.py"), str(out), "reference", "48"],
)
FULL = background(
    "hosts-full",
    __file__,
    lambda out: ["-m", "transparent_dist", PREEMPTIBLE, str(out), "full"],
    **GLOBAL,
)


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=2) as made:
        yield made


def _env(**extra: str) -> dict:
    return job_env(**Cluster.environment(), **extra)


def _plugin(script: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "transparent_dist", script, *args]


def test_two_nodes_train_as_one_process_and_write_once(cluster, tmp_path):
    background_result("hosts-reference").check()
    reference = np.asarray(load_ranks(REFERENCE, "reference", 1)[0]["weights"])
    shared = tmp_path / "shared"
    shared.mkdir()
    command = cluster.mpiexec(ranks=4, per_node=2)
    run(
        command + _plugin(str(JOBS / "hosts_check.py"), str(shared), "nodes", "12"), env=_env()
    ).check()
    ranks = load_ranks(shared, "nodes", 4)
    assert [r["host"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert [r["local"] for r in ranks] == [[0, 2], [1, 2], [0, 2], [1, 2]]
    for rank, record in enumerate(ranks):  # 4 ranks x 12 over TCP == 1 process x 48
        np.testing.assert_allclose(record["weights"], reference, atol=1e-5, err_msg=f"rank {rank}")
    lines = (shared / "log.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch")  # one writer: header + 2 epochs
    assert sorted(p.name for p in shared.iterdir()) == [
        "log.csv",
        "model.keras",
        *[f"nodes-rank{r}.json" for r in range(4)],
    ]
    env = _env()
    env.pop("TF_NUM_INTRAOP_THREADS")  # let the placement choose, per node
    doctor = run(cluster.mpiexec(4, 2) + [PYTHON, "-m", "transparent_dist", "doctor"], env=env)
    report = doctor.check().stdout
    assert "ranks per node: node0: 2 (ranks 0, 1); node1: 2 (ranks 2, 3)" in report
    threads = max(1, (os.cpu_count() or 1) // 2)  # the node's cores over its 2 ranks
    for rank, where in enumerate(["node0 (local 0/2)", "node0 (local 1/2)", "node1 (local 0/2)"]):
        assert f"rank {rank} on {where}: " in report, report
    assert report.count(f"intra-op threads {threads},") == 4, report


def _progress(out, lines, job, timeout=180):
    path = out / "progress-rank0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if path.exists() and len(path.read_text().split()) >= lines:
            return
        time.sleep(0.1)
    raise AssertionError(f"no progress: {job.poll()}")


def _start(cluster, out, env):
    import subprocess

    command = cluster.mpiexec(4, 2) + _plugin(PREEMPTIBLE, str(out), "run")
    return subprocess.Popen(
        command,
        env={**env, "STEP_SECONDS": "0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_lost_node_ends_the_job_and_the_rest_resume_from_the_checkpoint(cluster, tmp_path):
    background_result("hosts-full").check()
    reference = np.asarray(json.loads((FULL / "full-rank0.json").read_text())["weights"])
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    out.mkdir()
    env = _env(**GLOBAL, TD_CHECKPOINT_DIR=str(ckpt), TD_CHECKPOINT_EVERY="10")
    job = _start(cluster, out, env)
    _progress(out, 35, job)  # mid-epoch 2; the last checkpoint is at step 30
    cluster.kill_node(1)  # every process on node1: its ranks and its launcher proxy
    lost = time.monotonic()
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - lost < 10
    time.sleep(1)
    assert cluster.pids(0) == [] and cluster.pids(1) == []  # nothing left anywhere
    # The remaining node resumes at 2 ranks from the checkpoint written at 4.
    resumed = run(
        cluster.mpiexec(2, 2, nodes=[0]) + _plugin(PREEMPTIBLE, str(out), "run"), env=env
    ).check()
    assert f"resumed from {ckpt}" in resumed.stderr
    assert "exactly where it stopped" in resumed.stderr, resumed.stderr[-3000:]
    for rank in (0, 1):
        weights = np.asarray(json.loads((out / f"run-rank{rank}.json").read_text())["weights"])
        np.testing.assert_allclose(weights, reference, atol=1e-5)


def test_a_cut_link_is_named_and_ends_the_job_within_the_stall_bound(tmp_path):
    with Cluster(nodes=2) as cluster:
        env = _env(TD_STALL_WARN="2", TD_STALL_ABORT="6")
        job = _start(cluster, tmp_path, env)
        _progress(tmp_path, 15, job)
        cluster.cut_link(1)
        cut = time.monotonic()
        _, stderr = job.communicate(timeout=120)
        seconds = time.monotonic() - cut
        assert job.returncode != 0
        assert seconds < 6 + 8, seconds  # TD_STALL_ABORT, plus the step in flight
        assert "rank(s) 2, 3 (on node1: all 2 of its ranks, a lost node or link?)" in stderr
        time.sleep(1)
        assert cluster.pids(0) == []
