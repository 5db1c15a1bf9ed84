"""The fit-start line (ranks, per-rank and global batch, steps per epoch)
and the fit summary that leaves the native op's build out of its rate.

In-process tests build the line and the summary on a simulated world; one
MPI job (tests/jobs/fit_start_check.py) checks the real lines of five fits
on 2 ranks, the first of which builds the op with a stand-in compiler.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import JOBS, job_env, run

from transparent_dist.core import config, timeline, world


@pytest.fixture
def ranks(monkeypatch):
    """`ranks(n)` makes this process rank 0 of n; the start lines said so
    far are forgotten."""
    from transparent_dist.adapters import fit_start

    monkeypatch.setattr(fit_start, "_SAID", set())
    monkeypatch.setattr(fit_start, "_HINTED", {"done": False})

    def make(n: int) -> None:
        monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=n))

    return make


def _arrays(n: int = 1000):
    from transparent_dist.tf import inputs

    return inputs.classify(np.zeros((n, 4), "float32"), np.zeros(n, "float32"), None)


def _said(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if " fit: " in line]


def test_the_line_names_the_global_batch_per_rank_and_global(ranks, monkeypatch):
    from transparent_dist.adapters import fit_start

    ranks(2)
    batch = fit_start.describe(_arrays(), 256)
    assert fit_start.line(batch, 59) == (
        "fit: 2 ranks x 256 samples per rank = global batch 512 (TD_BATCH_SIZE=per_rank), "
        "59 steps per epoch"
    )
    monkeypatch.setattr(config.SETTINGS, "batch_size", "global")
    batch = fit_start.describe(_arrays(), 256)
    assert fit_start.line(batch, 4) == (
        "fit: global batch 256 (TD_BATCH_SIZE=global) = 2 ranks x 128 samples per rank, "
        "4 steps per epoch"
    )
    ranks(3)  # 100 over 3 ranks: blocks of 33 and 34
    batch = fit_start.describe(_arrays(), 100)
    assert "3 ranks x 33-34 samples per rank" in fit_start.line(batch, None)
    assert fit_start.line(batch, None).endswith("steps per epoch unknown")


def test_a_dataset_s_batch_is_read_from_the_dataset(ranks, capsys):
    import tensorflow as tf

    from transparent_dist.adapters import fit_start
    from transparent_dist.tf import inputs

    ranks(2)
    batched = tf.data.Dataset.range(100).batch(25).map(lambda v: v * 2).prefetch(1)
    batch = fit_start.describe(inputs.classify(batched, None, None), None)
    assert fit_start.line(batch, 2) == (
        "fit: 2 ranks x 1 batch of the dataset (25 samples) per rank = global batch 50, "
        "2 steps per epoch"
    )
    fit_start.say(batch, 2)  # the first fit of the job: with how to keep one process's batch
    assert _said(capsys)[0].endswith(
        "For one process's global batch, batch the dataset 2 times smaller"
    )
    # The outermost batch counts, not one under an unbatch; an interleave is not guessed.
    hidden = tf.data.Dataset.range(100).batch(25).unbatch().batch(10)
    assert fit_start.describe(inputs.classify(hidden, None, None), None).script == 10
    opaque = (
        tf.data.Dataset.range(100).batch(5).interleave(lambda v: tf.data.Dataset.from_tensors(v))
    )
    assert fit_start.describe(inputs.classify(opaque, None, None), None).script is None


def test_said_once_per_distinct_fit_with_one_hint(ranks, capsys):
    from transparent_dist.adapters import fit_start

    ranks(2)
    batch = fit_start.describe(_arrays(), 64)
    for _ in range(3):  # a loop of fit(epochs=1) calls
        fit_start.say(batch, 8)
    fit_start.say(fit_start.describe(_arrays(), 32), 16)
    said = _said(capsys)
    assert len(said) == 2, said
    assert said[0].startswith("transparent_dist: fit: 2 ranks x 64 samples per rank")
    assert said[0].endswith("For one process's global batch (64), set TD_BATCH_SIZE=global")
    assert "set TD_BATCH_SIZE=global" not in said[1]


def test_nothing_new_on_one_process(ranks, capsys):
    from transparent_dist.adapters import keras_callbacks

    ranks(1)
    callback = keras_callbacks.FitStart(_arrays(), 64)
    callback.params = {"steps": 8, "epochs": 1}
    callback.on_train_begin()
    assert _said(capsys) == []
    ranks(2)  # the control: the same callback on 2 ranks speaks
    callback = keras_callbacks.FitStart(_arrays(), 64)
    callback.params = {"steps": 8, "epochs": 1}
    callback.on_train_begin()
    assert _said(capsys) == [
        "transparent_dist: fit: 2 ranks x 64 samples per rank = global batch 128 "
        "(TD_BATCH_SIZE=per_rank), 8 steps per epoch. For one process's global batch (64), "
        "set TD_BATCH_SIZE=global"
    ]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("compiled", [True, False])
def test_the_summary_leaves_the_op_build_out(ranks, monkeypatch, capsys, compiled):
    """A fit of 10 s wall, 6 s of which built the op in its first step:
    1,000 samples make 250 samples/s, not 100. Without a compilation (the
    op loaded from the cache) nothing is left out."""
    from transparent_dist.adapters import keras_callbacks

    ranks(1)
    clock = _Clock()
    monkeypatch.setattr(keras_callbacks.time, "perf_counter", clock)
    summary = keras_callbacks.FitSummary()
    summary.params = {"steps": 10}
    summary.on_train_begin()
    summary.on_train_batch_begin(0)
    timeline.add_build(clock.now, clock.now + 6.0, compiled=compiled)
    clock.now += 10.0
    timeline.STATS.samples += 1000
    summary.on_train_batch_end(0)
    summary.on_train_end()
    (line,) = _said(capsys)
    if compiled:
        assert "fit: 250 samples/s on 1 ranks (excluding the 6.0 s op build);" in line
    else:
        assert "fit: 100 samples/s on 1 ranks;" in line


def _fake_compiler(tmp_path, built: str) -> str:
    """A stand-in for the C++ compiler: 2 s, then the op built before."""
    script = tmp_path / "fake_cxx"
    script.write_text(
        "#!/bin/sh\nsleep 2\n"
        'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; fi; shift; done\n'
        f'cp "{built}" "$out"\n'
    )
    script.chmod(0o755)
    return str(script)


def _built_op(monkeypatch) -> str:
    from transparent_dist.tf import native

    monkeypatch.delenv("TD_CACHE_DIR", raising=False)  # the jobs' default cache
    return str(native.library_path())


@pytest.mark.mpi
def test_start_and_summary_lines_of_real_fits_on_two_ranks(tmp_path, monkeypatch):
    """Five fits (tests/jobs/fit_start_check.py); the first builds the op
    into an empty cache with a stand-in compiler (the real op, after 2 s)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    compiler = _fake_compiler(tmp_path, _built_op(monkeypatch))
    env = job_env(TD_CACHE_DIR=str(cache), CXX=compiler)
    err = run([str(JOBS / "fit_start_check.py")], ranks=2, env=env).check().stderr
    parts = re.split(r"^--- fit (\d)$", err, flags=re.M)
    fits = {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    assert sorted(fits) == [1, 2, 3, 4, 5, 6], err[-3000:]

    def lines(n: int, start: str) -> list[str]:
        return [s for s in fits[n].splitlines() if s.startswith(f"transparent_dist: fit: {start}")]

    assert lines(1, "2 ranks x") == [
        "transparent_dist: fit: 2 ranks x 64 samples per rank = global batch 128 "
        "(TD_BATCH_SIZE=per_rank), 5 steps per epoch. For one process's global batch (64), "
        "set TD_BATCH_SIZE=global"
    ]
    assert lines(2, "2 ranks x") == []  # the same fit again: said once
    assert lines(3, "global") == [
        "transparent_dist: fit: global batch 64 (TD_BATCH_SIZE=global) = 2 ranks x 32 "
        "samples per rank, 10 steps per epoch"
    ]
    assert lines(4, "2 ranks x") == [
        "transparent_dist: fit: 2 ranks x 1 batch of the generator per rank = global batch "
        "of 2 of its batches, steps per epoch unknown"
    ]
    assert lines(5, "2 ranks x") == [
        "transparent_dist: fit: 2 ranks x 1 batch of the dataset (32 samples) per rank = "
        "global batch 64, 10 steps per epoch"
    ]
    # Fit 1 built the op (2 s of stand-in compiler) in its first step.
    found = re.search(
        r"fit: ([\d,]+) samples/s on 2 ranks \(excluding the ([\d.]+) s op build\)", fits[1]
    )
    assert found, fits[1]
    rate, build = float(found[1].replace(",", "")), float(found[2])
    wall = float(re.search(r"--- fit 1 took ([\d.]+) s", fits[1])[1])
    assert 2.0 <= build < wall
    # 2 epochs of 640 samples; the wall time less the build bounds the fit's
    # own time from above (it also holds the set-up before the fit's first
    # callback): with the build left in, the rate would be below 1280 / wall.
    assert rate >= 0.95 * 1280 / (wall - build), (rate, wall, build)
    for n in (2, 3, 4, 5):
        assert "op build" not in fits[n]
