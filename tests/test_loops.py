"""TF1 Session scripts and TF2 custom loops, unmodified, on 2 and 3 ranks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import JOBS, load_ranks, run, run_together

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "loops.py")


def _weights(out, tag, ranks):
    return [np.asarray(r["weights"]) for r in load_ranks(out, tag, ranks)]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """Per kind, once: the ranks-with-their-own-data job at 2 and 3 ranks and
    its control (the same job at 2 ranks without the plugin)."""
    done = {}

    def jobs(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp(f"own_{kind}")
            stderr = {}
            for ranks in (2, 3):
                command = ["-m", "transparent_dist", SCRIPT, kind, "own", str(out), f"p{ranks}"]
                stderr[ranks] = run(command, ranks=ranks).check().stderr
            run([SCRIPT, kind, "own", str(out), "control"], ranks=2).check()
            done[kind] = out, stderr
        return done[kind]

    return jobs


@pytest.mark.parametrize("kind", ["tf1", "tf2"])
def test_ranks_with_their_own_data_end_identical(own_data, kind):
    out, stderr = own_data(kind)
    for ranks in (2, 3):
        assert "fed the same values" not in stderr[ranks]
        weights = _weights(out, f"p{ranks}", ranks)
        for other in weights[1:]:
            np.testing.assert_array_equal(other, weights[0])
    # The control: the same job without the plugin drifts apart.
    control = _weights(out, "control", 2)
    assert np.abs(control[0] - control[1]).max() > 1e-3


# tf1ref: TF 1.x scripts' `disable_v2_behavior()` (ref variables), whose
# broadcast once read the variables before their initializer had run.
@pytest.mark.parametrize("kind", ["tf1", "tf1ref", "tf2"])
def test_same_data_everywhere_equals_one_process(tmp_path, kind):
    one, job = run_together(
        dict(args=[SCRIPT, kind, "same", str(tmp_path), "one"]),
        dict(args=["-m", "transparent_dist", SCRIPT, kind, "same", str(tmp_path), "p2"], ranks=2),
    )
    one.check()
    job.check()
    reference = _weights(tmp_path, "one", 1)[0]
    for weights in _weights(tmp_path, "p2", 2):
        np.testing.assert_allclose(weights, reference, atol=1e-5)
    if kind.startswith("tf1"):
        # Every rank fed the whole data: said once, by rank 0, with the fix.
        assert job.stderr.count("every rank fed the same values") == 1
        assert "shard_range" in job.stderr


def test_tf1_saver_and_file_writer_write_on_rank_zero_only(own_data):
    out, _ = own_data("tf1")
    ranks = load_ranks(out, "p2", 2)
    assert ranks[0]["saved"].endswith("p2-model.ckpt") and ranks[1]["saved"] is None
    assert _graph_events(out / "p2-logs") == 1
    assert [r["event_writer"] for r in ranks] == ["EventFileWriter", "_NoEvents"]
    # Without the plugin both ranks write an event file of the same name (v1
    # names it by time and host), each over the other.
    control = load_ranks(out, "control", 2)
    assert [r["event_writer"] for r in control] == ["EventFileWriter", "EventFileWriter"]
    assert control[1]["saved"] is not None


def _graph_events(directory) -> int:
    import tensorflow as tf

    return sum(
        1
        for path in directory.glob("events.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        if event.HasField("graph_def")
    )
