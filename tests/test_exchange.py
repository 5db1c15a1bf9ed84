"""The gradient-exchange variants compute what the plain fused path does,
and the end-of-fit summary and the timeline say where the time went."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import JOBS, ROOT, background, background_result, job_env, load_ranks, run

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths")
    job = run(
        ["-m", "transparent_dist", str(JOBS / "exchange_paths.py"), str(out)], ranks=3
    ).check()
    return job, load_ranks(out, "paths", 3)


def test_native_op_is_used_unless_turned_off(paths):
    for result in paths[1]:
        assert result["fused"]["path"] == "native op"
        assert result["fp16"]["path"] == "native op"
        assert result["numpy"]["path"] == "numpy fallback"


@pytest.mark.parametrize("prefix", ["", "numpy_"])
def test_buckets_are_bit_identical_to_one_fused_buffer(paths, prefix):
    fused = "numpy" if prefix else "fused"
    for result in paths[1]:
        np.testing.assert_array_equal(
            result[prefix + "buckets"]["weights"], result[fused]["weights"]
        )


def test_early_buckets_do_not_wait_for_the_rest_of_backprop(paths):
    # Tiny buckets, last layer first: only the last ops depend on the first
    # layer's kernel gradient (the last work of backprop); the others may
    # run while it is computed. And a kernel computed in blocks sends each
    # block as soon as it exists: the op sending block j waits for blocks
    # 0..j only (each op also waits for the one before it).
    ancestry = paths[1][0]["ancestry"]
    waits = ancestry["waits_for_first_layer"]
    assert ancestry["exchanges"] > ancestry["variables"] == 6
    assert not waits[0] and waits[-1] and waits == sorted(waits)
    blocks = ancestry["second_kernel_blocks"]
    awaited = [n for n in ancestry["second_kernel_blocks_awaited"] if n < blocks]
    assert blocks == 64 and awaited == sorted(awaited)
    assert set(range(1, blocks)) <= set(awaited)


def test_buckets_follow_one_negotiation_in_bucket_order(paths):
    # The sample counts cross the network once per step, and each bucket's
    # op starts only after the previous one ended: every rank hands its
    # communication thread the buckets in the same order.
    ancestry = paths[1][0]["ancestry"]
    assert ancestry["negotiations"] == 1
    assert ancestry["buckets"] == list(range(ancestry["exchanges"]))
    assert ancestry["chained"] == [True] * ancestry["exchanges"]


def test_native_op_equals_numpy_exchange(paths):
    # Same arithmetic up to rounding: the op scales each rank's gradient by
    # its share before the sum, the numpy path divides the sum afterwards.
    for result in paths[1]:
        np.testing.assert_allclose(
            result["fused"]["weights"], result["numpy"]["weights"], atol=1e-6
        )
        np.testing.assert_allclose(result["fused"]["loss"], result["numpy"]["loss"], rtol=1e-6)
        np.testing.assert_allclose(
            result["fp16"]["weights"], result["numpy_fp16"]["weights"], atol=2e-3
        )


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
    assert job.stderr.count("samples/s on 3 ranks; gradient exchange") == 7  # one per fit


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
    # One file for the job (test_summaries.py: its clock), a process per rank.
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    named = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert named == {0: "rank 0", 1: "rank 1"}
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank and e["ph"] == "X"]
        assert {"step", "wait", "exchange", "metrics", "queued"} <= {e["name"] for e in mine}
        # Each bucket's exchange (here one per step) carries its number.
        buckets = [e["args"]["bucket"] for e in mine if e["name"] in ("queued", "exchange")]
        assert set(buckets) == {0}
        assert all(e["dur"] >= 0 for e in mine)
        steps = [e for e in mine if e["name"] == "step"]
        assert len(steps) == 15  # 1800 training samples / (2 ranks x 64)


def test_without_a_compiler_every_rank_falls_back_to_numpy(tmp_path):
    """TD_NATIVE=auto: one warning, and the job trains (on the numpy path);
    TD_NATIVE=on: the job fails with the reason."""
    mlp = [str(ROOT / "examples" / "mlp.py"), "--epochs", "1", "--samples", "512"]
    no_compiler = {"CXX": str(tmp_path / "no-such-compiler"), "TD_CACHE_DIR": str(tmp_path)}
    job = run(["-m", "transparent_dist", *mlp], ranks=2, env=job_env(**no_compiler)).check()
    assert job.stderr.count("the native gradient exchange is not available") == 1
    assert "no-such-compiler" in job.stderr
    assert "final: loss=" in job.stdout
    job = run(["-m", "transparent_dist", *mlp], ranks=2, env=job_env(TD_NATIVE="on", **no_compiler))
    assert job.returncode != 0
    assert "TD_NATIVE=on, but the native gradient exchange is not available" in job.stderr
    assert not list(tmp_path.glob("*.so"))


def test_a_node_without_a_compiler_uses_the_op_built_elsewhere():
    """The cache key does not name the compiler: the op built before the
    tests (the login node's `python -m transparent_dist build`) is found."""
    env = job_env(CXX="/no/such/compiler", TD_NATIVE="on")
    job = run(["-m", "transparent_dist", "doctor"], ranks=2, env=env).check()
    assert "gradient exchange: native op (" in job.stdout


# A build into an empty cache (a compiler's ~15 s on one core): in the
# background lane from the session's start (conftest.background).
FRESH_BUILD = background(
    "exchange-fresh-build",
    __file__,
    lambda out: ["-m", "transparent_dist", "build"],
    TD_CACHE_DIR="{out}",
)


def test_the_op_build_says_what_it_does_and_how_long_it_took():
    """A first build is announced and timed (the ~10 s a new user otherwise
    sees as silence inside epoch 1)."""
    proc = background_result("exchange-fresh-build")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the native gradient exchange (once for this TensorFlow" in proc.stderr
    assert re.search(r"native gradient exchange built in \d+\.\d s", proc.stderr)
    assert list(FRESH_BUILD.glob("exchange_op-*.so"))
