"""The ordinary scripts in examples/ run unmodified on 2 ranks and learn."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.mpi


def _final(stdout: str) -> dict[str, float]:
    lines = [line for line in stdout.splitlines() if line.startswith("final:")]
    assert len(lines) == 1, stdout  # printed by rank 0 only
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.e+-]+)", lines[0])}


def test_mlp_example_trains_on_two_ranks(tmp_path):
    job = run(
        [
            "-m",
            "transparent_dist",
            str(ROOT / "examples" / "mlp.py"),
            "--epochs",
            "4",
            "--samples",
            "8000",
            "--save",
            str(tmp_path / "mlp.keras"),
        ],
        ranks=2,
    ).check()
    assert _final(job.stdout)["loss"] < 0.3  # the targets' variance is about 0.9
    assert job.stdout.count("Epoch 4/4") == 1
    assert (tmp_path / "mlp.keras").stat().st_size > 0


def test_cnn_example_trains_on_two_ranks():
    job = run(
        ["-m", "transparent_dist", str(ROOT / "examples" / "cnn.py"), "--epochs", "3"], ranks=2
    ).check()
    assert _final(job.stdout)["accuracy"] > 0.9
