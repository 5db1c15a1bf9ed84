"""8 and 16 ranks on this 2-core machine (oversubscribed: the plugin makes
MPICH's waiting ranks sleep, core/world.py `yield_when_oversubscribed`):
N x b = 1 x N.b, and one rank failing mid-training ends the job.

One job per rank count serves both (TensorFlow's import costs seconds per
rank, 16 of them on 2 cores): it trains, each rank writes its weights, then
rank N - 3 raises in its third epoch. The global batch is the same at 8 and 16
ranks, so one plain-Keras reference serves both; it runs in the background
lane from the session's start (conftest.background).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import JOBS, background, background_result, leftovers, run

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "many_ranks.py")
RANKS = (8, 16)
# From the failing rank's raise to the launcher's return: the abort reaches
# 16 sleeping ranks on 2 cores in a few seconds (3.7 s measured here).
PROMPT_SECONDS = 30


def _weights(directory, name):
    return json.loads((directory / f"{name}.json").read_text())


REFERENCE = background(
    "many_ranks-reference", __file__, lambda out: [SCRIPT, str(out), "reference"]
)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    dirs = {n: tmp_path_factory.mktemp(f"ranks{n}") for n in RANKS}
    done = {}
    for n in RANKS:
        done[n] = run(
            ["-m", "transparent_dist", SCRIPT, str(dirs[n]), "plugin"], ranks=n, timeout=600
        )
        done[n].ended = time.time()
    background_result("many_ranks-reference").check()
    return {
        "reference": _weights(REFERENCE, "reference-1-rank0"),
        **{n: (done[n], dirs[n]) for n in RANKS},
    }


@pytest.mark.parametrize("ranks", RANKS)
def test_n_ranks_times_b_equals_one_process_times_nb(jobs, ranks):
    job, directory = jobs[ranks]
    reference = jobs["reference"]
    assert reference["steps"] == 10  # 2 epochs of 5 batches (the last 44 rows)
    first = _weights(directory, f"plugin-{ranks}-rank0")
    for rank in range(ranks):
        result = _weights(directory, f"plugin-{ranks}-rank{rank}")
        assert result["steps"] == reference["steps"], (rank, job.stderr[-3000:])
        np.testing.assert_allclose(
            result["weights"], reference["weights"], atol=1e-5, rtol=0, err_msg=f"rank {rank}"
        )
        np.testing.assert_array_equal(result["weights"], first["weights"], err_msg=f"rank {rank}")
    if (os.cpu_count() or 1) < ranks:  # the plugin made waiting ranks sleep
        assert f"{ranks} ranks share this node's" in job.stderr, job.stderr[-3000:]


@pytest.mark.parametrize("ranks", RANKS)
def test_one_failing_rank_ends_the_job_promptly_and_is_named(jobs, ranks):
    job, directory = jobs[ranks]
    failing = ranks - 3
    text = job.stdout + job.stderr
    assert job.returncode != 0
    assert f"[rank {failing}] RuntimeError: rank {failing} lost its input" in text, text[-3000:]
    assert f"rank {failing} of {ranks} failed with RuntimeError" in text
    assert text.count("failed with") == 1  # no other rank is blamed
    assert "finished" not in job.stdout
    raised = float((directory / "fault").read_text())
    assert job.ended - raised < PROMPT_SECONDS, job.ended - raised
    assert not leftovers(str(directory / "pid-*"))
