"""The stall watchdog's reasoning, in-process: ranks in the same collective
number but different phases can never meet there, and end the job."""

from __future__ import annotations

import numpy as np
import pytest

from transparent_dist.core import progress, stall


class _Comm:
    def __init__(self, size: int) -> None:
        self.size = size

    def Get_size(self) -> int:
        return self.size


class _Aborted(Exception):
    pass


@pytest.fixture
def watchdog(monkeypatch):
    def abort(code=1):
        raise _Aborted(code)

    monkeypatch.setattr(stall.world, "abort", abort)
    return stall._Watchdog(_Comm(3), 0, [0, 2], warn=60, abort=600)


def _arrive(dog, rank, count, kind, index, label="agreement check"):
    code = progress.KINDS.index(kind)
    dog._note(rank, np.array([count, progress.CODES[label], code, index], np.int64))


def test_a_rank_at_the_script_end_while_others_wait_in_fit_ends_the_job(watchdog, capsys):
    for rank in range(3):
        _arrive(watchdog, rank, 17, "fit", 1)
    _arrive(watchdog, 0, 18, "fit", 1)
    _arrive(watchdog, 2, 18, "fit", 1)
    _arrive(watchdog, 1, 18, "script end", 1, "phase check")
    watchdog._check_phases(100.0)  # noted; a phase check may still say it better
    watchdog._check_phases(102.0)
    with pytest.raises(_Aborted):
        watchdog._check_phases(103.5)
    text = capsys.readouterr().err
    assert "rank(s) 1 reached the end of the script" in text
    assert "rank(s) 0, 2 wait in collective #18 of fit #1" in text


def test_ranks_in_step_or_merely_behind_are_left_alone(watchdog):
    for rank in range(3):
        _arrive(watchdog, rank, 5, "fit", 1)
    _arrive(watchdog, 0, 6, "evaluate", 1, "phase check")  # rank 0 ahead: the others follow
    _arrive(watchdog, 1, 5, "script end", 1)  # an old count: not at the front
    for now in (0.0, 10.0, 20.0):
        watchdog._check_phases(now)


def test_different_phases_at_one_collective_are_named(watchdog, capsys):
    _arrive(watchdog, 0, 9, "fit", 2)
    _arrive(watchdog, 1, 9, "evaluate", 1)
    _arrive(watchdog, 2, 9, "fit", 2)
    watchdog._check_phases(0.0)
    with pytest.raises(_Aborted):
        watchdog._check_phases(5.0)
    text = capsys.readouterr().err
    assert "rank(s) 0, 2 in fit #2; rank(s) 1 in evaluate #1" in text
