"""The gradient-exchange variants compute what the plain fused path does,
and the end-of-fit summary and the timeline say where the time went."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import JOBS, ROOT, job_env, load_ranks, run


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths")
    job = run(
        ["-m", "transparent_dist", str(JOBS / "exchange_paths.py"), str(out)], ranks=3
    ).check()
    return job, load_ranks(out, "paths", 3)


def test_buckets_are_bit_identical_to_one_fused_buffer(paths):
    for result in paths[1]:
        np.testing.assert_array_equal(result["buckets"]["weights"], result["fused"]["weights"])


@pytest.mark.parametrize("compression,tolerance", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_compression_stays_close_and_keeps_ranks_equal(paths, compression, tolerance):
    results = paths[1]
    for result in results:
        fused = np.asarray(result["fused"]["weights"])
        compressed = np.asarray(result[compression]["weights"])
        assert np.abs(compressed - fused).max() < tolerance * max(1.0, np.abs(fused).max())
        assert result[compression]["loss"][-1] < 1.1 * result["fused"]["loss"][-1]
    for result in results[1:]:
        np.testing.assert_array_equal(
            result[compression]["weights"], results[0][compression]["weights"]
        )


def test_summary_line_once_per_fit(paths):
    job = paths[0]
    assert job.stderr.count("samples/s on 3 ranks; gradient exchange") == 4  # one per fit


def test_timeline_is_chrome_trace_json(tmp_path):
    trace = tmp_path / "trace"
    run(
        [
            "-m",
            "transparent_dist",
            str(ROOT / "examples" / "mlp.py"),
            "--epochs",
            "1",
            "--samples",
            "2000",
        ],
        ranks=2,
        env=job_env(TD_TIMELINE=str(trace)),
    ).check()
    for rank in (0, 1):
        events = json.loads((tmp_path / f"trace.rank{rank}.json").read_text())["traceEvents"]
        names = {e["name"] for e in events}
        assert {"step", "exchange", "allreduce", "copy"} <= names
        assert all(e["ph"] == "X" and e["dur"] >= 0 and e["pid"] == rank for e in events)
        steps = [e for e in events if e["name"] == "step"]
        assert len(steps) == 15  # 1800 training samples / (2 ranks x 64)
