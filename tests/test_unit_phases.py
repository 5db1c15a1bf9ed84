"""The call-sequence check, in-process: `phases.enter` (its counting, the
digest comparison and the message naming each rank's call), the settings
check on one rank, and the agreement to stop, with `MPI.COMM_SELF` or a
fake communicator standing for other ranks."""

from __future__ import annotations

import numpy as np
import pytest

from transparent_dist.core import config, log, phases, progress
from transparent_dist.core.errors import CollectiveError


class OtherRanks:
    """A communicator where this process is rank 0 and ranks 1.. send
    `digests` (None: the same as rank 0's) and `phases` (the dicts
    `enter` gathers on the rare path)."""

    def __init__(self, digests, others):
        self.digests, self.others = digests, others
        self.gathered = 0

    def Get_size(self):  # noqa: N802 - MPI's name
        return 1 + len(self.digests)

    def Get_rank(self):  # noqa: N802
        return 0

    def Allgather(self, send, recv):  # noqa: N802
        send = np.asarray(send[0] if isinstance(send, list) else send).view(np.uint8).reshape(-1)
        recv = np.asarray(recv[0] if isinstance(recv, list) else recv).view(np.uint8).reshape(-1)
        n = len(send)
        recv[:n] = send
        for rank, digest in enumerate(self.digests, start=1):
            mine = send if digest is None else np.frombuffer(digest, np.uint8)
            recv[rank * n : (rank + 1) * n] = mine

    def allgather(self, value):
        self.gathered += 1
        return [value, *self.others]


def _phase(kind, index, site, **arguments):
    return {
        "kind": kind,
        "index": index,
        "site": site,
        "arguments": {**arguments, **config.shared()},
        "after": "the start of the script",
    }


@pytest.fixture(autouse=True)
def fresh():
    phases.reset()
    progress.reset()
    log.reset()
    yield
    phases.reset()
    progress.reset()


# ---------------------------------------------------------------- counting


def test_enter_counts_each_kind_and_names_the_call_site():
    phases.enter("fit", {"epochs": 2})
    line = test_enter_counts_each_kind_and_names_the_call_site.__code__.co_firstlineno + 1
    assert progress.current() == f"fit #1 at test_unit_phases.py:{line}"
    phases.enter("evaluate")
    phases.enter("fit")
    assert progress.current().startswith("fit #2 at test_unit_phases.py:")
    assert progress.phase() == (progress.KINDS.index("fit"), 2)


def test_the_script_end_names_what_came_before():
    phases.enter("predict")
    phases.enter("script end")
    assert progress.current().startswith("the end of the script (after predict #1 at ")
    assert progress.phase() == (progress.KINDS.index("script end"), 1)


def test_reset_starts_the_count_again():
    phases.enter("fit")
    phases.enter("fit")
    phases.reset()
    progress.reset()
    assert progress.current() == "the start of the script"
    phases.enter("fit")
    assert progress.phase() == (progress.KINDS.index("fit"), 1)


def test_one_rank_always_agrees_with_itself():
    from mpi4py import MPI

    phases.enter("fit", {"steps_per_epoch": 3}, comm=MPI.COMM_SELF)
    assert progress.phase()[1] == 1


# ------------------------------------------------------ digest comparison


def test_equal_digests_cost_one_allgather_and_nothing_more():
    comm = OtherRanks([None, None], [])
    phases.enter("fit", {"epochs": 1}, comm=comm)
    assert comm.gathered == 0


def test_another_call_on_one_rank_is_named_on_every_rank():
    other = _phase("evaluate", 1, "train.py:12")
    comm = OtherRanks([None, b"\x01" * 8], [_phase("fit", 1, "train.py:9"), other])
    with pytest.raises(CollectiveError) as raised:
        phases.enter("fit", comm=comm)
    message = str(raised.value)
    assert "the ranks are not making the same calls in the same order" in message
    assert "rank 0: fit #1 at test_unit_phases.py:" in message
    assert "rank 1: fit #1 at train.py:9; rank 2: evaluate #1 at train.py:12" in message
    assert comm.gathered == 1


def test_only_the_differing_arguments_are_shown():
    comm = OtherRanks(
        [b"\x02" * 8], [_phase("fit", 1, "train.py:9", epochs=3, steps_per_epoch=None)]
    )
    with pytest.raises(CollectiveError) as raised:
        phases.enter("fit", {"epochs": 3, "steps_per_epoch": 10}, comm=comm)
    message = str(raised.value)
    assert "with steps_per_epoch=10; rank 1: fit #1 at train.py:9 with steps_per_epoch=None" in (
        message
    )
    assert "epochs=" not in message


def test_a_settings_change_on_one_rank_shows_at_the_next_phase():
    shared = config.shared()
    name = next(iter(shared))
    changed = {**_phase("fit", 1, "train.py:9"), "arguments": {**shared, name: "changed"}}
    comm = OtherRanks([b"\x03" * 8], [changed])
    with pytest.raises(CollectiveError, match=f"{name}='changed'"):
        phases.enter("fit", comm=comm)


def test_many_ranks_are_cut_to_eight_lines():
    others = [_phase("evaluate", 1, "train.py:1")] * 11
    comm = OtherRanks([b"\x04" * 8] * 11, others)
    with pytest.raises(
        CollectiveError, match=r"rank 7: evaluate #1 at train.py:1; \.\.\. \(4 more"
    ):
        phases.enter("fit", comm=comm)


# ---------------------------------------------------------- settings check


def test_settings_check_on_one_rank_passes_quietly(capsys):
    phases.check_settings()
    assert capsys.readouterr().err == ""


def test_a_bad_setting_ends_the_job_with_status_2(monkeypatch, capsys):
    monkeypatch.setattr(config, "ERRORS", ["transparent_dist: TD_STEPS='some' is not one of ..."])
    with pytest.raises(SystemExit) as raised:
        phases.check_settings()
    assert raised.value.code == phases.SETTINGS_STATUS == 2
    err = capsys.readouterr().err
    assert "TD_STEPS='some'" in err and "the job ends with status 2" in err


def test_a_near_miss_of_a_setting_is_an_error_a_stranger_a_note(monkeypatch, capsys):
    monkeypatch.setenv("TD_CHEKPOINT_DIR", "/tmp/x")
    with pytest.raises(SystemExit):
        phases.check_settings()
    assert "TD_CHEKPOINT_DIR is not a setting (did you mean TD_CHECKPOINT_DIR?)" in (
        capsys.readouterr().err
    )
    monkeypatch.delenv("TD_CHEKPOINT_DIR")
    monkeypatch.setenv("TD_WHATEVER_ELSE", "1")
    phases.check_settings()
    assert "TD_WHATEVER_ELSE is not a setting of transparent_dist: ignored" in (
        capsys.readouterr().err
    )


def test_agree_to_stop_on_one_rank_sets_the_stop_bit():
    assert phases.agree_to_stop(False, 1, "epoch 1") == 1
    assert phases.agree_to_stop(True, 2, "epoch 1") == 2 | phases.Wish.STOP
