"""End-of-run summaries for GradientTape loops and TF1 session loops, and the
job's one timeline file (every rank, one clock, a process per rank)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import JOBS, job_env, run


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank job: a GradientTape loop and a TF1 session loop, rank 1
    starting 0.5 s after rank 0, clock offsets measured by ping-pong."""
    out = tmp_path_factory.mktemp("summaries")
    finished = run(
        [str(JOBS / "summaries.py"), str(out), "measure"],
        ranks=2,
        env=job_env(TD_TIMELINE=str(out / "trace")),
    ).check()
    return finished, out, json.loads((out / "summaries.json").read_text())


def _summary(stderr: str, kind: str) -> re.Match:
    pattern = (
        rf"^transparent_dist: {kind}: (\d+) steps; ([\d,]+) samples/s on (\d+) ranks "
        r"\(steps (\d+)-(\d+), ([\d.]+) ms/step\); gradient exchange ([\d.]+)% of the time "
        r"\(([\d.]+) ms/step, ([\d.]+) MB/step\), waiting for other ranks ([\d.]+)%"
    )
    found = list(re.finditer(pattern, stderr, re.MULTILINE))
    assert len(found) == 1, stderr[-3000:]  # one line, from rank 0 only
    return found[0]


@pytest.mark.mpi
@pytest.mark.parametrize(
    "kind,prefix", [("custom training loop", "tf2"), ("TF1 session loop", "tf1")]
)
def test_each_loop_ends_with_one_summary_line(job, kind, prefix):
    finished, _, result = job
    line = _summary(finished.stderr, kind)
    steps = result[f"{prefix}_steps"]
    assert int(line[1]) == steps and int(line[3]) == 2
    assert (int(line[4]), int(line[5])) == (2, steps)  # timed after the first step
    # The script's own timing of steps 2..n on rank 0: the summary takes the
    # slowest rank's, so a little lower, never far off.
    expected = 2 * result[f"{prefix}_batch"] * (steps - 1) / result[f"{prefix}_seconds"]
    rate = float(line[2].replace(",", ""))
    assert 0.6 * expected < rate < 1.1 * expected, (rate, expected)
    assert float(line[9]) == round(4 * result[f"{prefix}_parameters"] / 1e6, 1)  # float32 grads
    assert 0 < float(line[7]) < 100 and 0 <= float(line[10]) < 100


@pytest.mark.mpi
def test_one_timeline_file_every_rank_on_one_clock(job):
    finished, out, result = job
    path = out / "trace.json"
    assert finished.stderr.count(f"timeline in {path}") == 1
    assert sorted(p.name for p in out.iterdir()) == ["summaries.json", "trace.json"]  # no temp
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1"}
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    times = [e["ts"] for e in spans]
    assert times == sorted(times)
    steps = result["tf2_steps"] + result["tf1_steps"]
    for rank in (0, 1):
        assert sum(e["name"] == "step" and e["pid"] == rank for e in spans) == steps
    # The k-th gradient exchange ends at one instant on every rank; rank 1
    # started 0.5 s later, which a file without one clock would show.
    ends = [
        [e["ts"] + e["dur"] for e in spans if e["name"] == "exchange" and e["pid"] == rank]
        for rank in (0, 1)
    ]
    assert len(ends[0]) == len(ends[1]) == steps
    gaps = sorted(abs(a - b) for a, b in zip(*ends, strict=True))
    assert gaps[len(gaps) // 2] < 2000, gaps  # microseconds


# ------------------------------------------------------------ in-process


def test_batch_size_is_the_leading_dimension_all_arguments_share():
    np = pytest.importorskip("numpy")
    from transparent_dist.core import loop_summary

    assert loop_summary.batch_size([np.zeros((32, 6)), np.zeros((32, 1)), 0.1]) == 32
    assert loop_summary.batch_size([np.zeros((32, 6)), np.zeros((16, 1))]) is None
    assert loop_summary.batch_size([np.float32(1.0), "text", None]) is None


def test_summary_line_without_a_known_batch_gives_steps_per_second():
    from transparent_dist.core import loop_summary

    figures = {
        "steps": 101,
        "first_steps": 1,
        "timed_steps": 100,
        "seconds": 2.0,
        "samples": -1.0,
        "exchange": 0.5,
        "bytes": 4e8,
        "wait": 0.1,
    }
    line = loop_summary._line("custom training loop", [figures, dict(figures, exchange=0.3)], 2)
    assert line == (
        "custom training loop: 101 steps; 50.0 steps/s on 2 ranks (steps 2-101, 20.0 ms/step); "
        "gradient exchange 20.0% of the time (4.00 ms/step, 4.0 MB/step), waiting for other "
        "ranks 5.0%"
    )
    one = dict(figures, steps=1, timed_steps=0)
    assert loop_summary._line("TF1 session loop", [one, one], 2) == (
        "TF1 session loop: 1 step on 2 ranks (too few to time)"
    )


def test_one_process_timeline_is_one_named_file(tmp_path, monkeypatch):
    from transparent_dist.core import config, timeline, timeline_file

    monkeypatch.setattr(config.SETTINGS, "timeline", str(tmp_path / "run" / "trace.json"))
    monkeypatch.setattr(timeline_file, "_EVENTS", [])
    monkeypatch.setattr(timeline_file, "_THREADS", {})
    monkeypatch.setattr(timeline_file, "_RANKS", set())
    timeline.take_events()  # nothing from earlier tests
    timeline.add("step", 2.0, 2.5)
    timeline.add("step", 1.0, 1.5)
    assert timeline_file.write() == str(tmp_path / "run" / "trace.json")
    events = json.loads((tmp_path / "run" / "trace.json").read_text())["traceEvents"]
    assert [e["args"]["name"] for e in events if e["name"] == "process_name"] == ["rank 0"]
    spans = [e for e in events if e["ph"] == "X"]
    assert [e["dur"] for e in spans] == [5e5, 5e5] and spans[0]["ts"] < spans[1]["ts"]
    assert timeline_file.path_for("out/trace") == "out/trace.json"


class _OtherHost:
    """A communicator as rank 0 sees it, its peer on another host whose
    clock reads 5 s ahead of rank 0's."""

    def Get_rank(self):  # noqa: N802 - mpi4py's name
        return 0

    def allgather(self, value):
        return [value, ("elsewhere", True)]

    def Send(self, buffer, dest, tag):  # noqa: N802
        pass

    def Recv(self, buffer, source, tag):  # noqa: N802
        import time

        buffer[0] = time.perf_counter() + 5.0


def test_a_rank_on_another_host_gets_its_measured_offset():
    from transparent_dist.core import clocks

    offsets = clocks.offsets(_OtherHost())
    assert offsets[0] == 0.0 and abs(offsets[1] - 5.0) < 0.01
