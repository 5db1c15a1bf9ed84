"""The calls every rank must make in the same order, checked rather than trusted.

```python
from transparent_dist.core import sequence
sequence.enter("fit", {"epochs": 3, "steps_per_epoch": None})   # in the fit patch
print(sequence.current())      # "fit #1 at train.py:40"
```

Each phase of a job that issues collectives (every `fit`, `evaluate` and
`predict`, and the end of the script) starts with one check: every rank
contributes an 8-byte digest of (phase, its count, the arguments that decide
how many collectives it will issue) to one `Allgather`. Equal digests cost
nothing more. Different ones (one rank in `fit` while another is in
`evaluate`, a second `fit` on one rank only, `steps_per_epoch` given on one
rank) raise the same error on every rank, naming each rank's phase and call
site, before any mismatched collective can pair up or wait forever. The end
of the script is a phase too, so a rank that finishes while another is still
calling `fit` is named at once.

The stall watchdog (`stall`) reports the phase each rank is in.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import os
import sys
from typing import Any

import numpy as np

from transparent_dist.core import collectives, log, stall, world
from transparent_dist.core.errors import CollectiveError

__all__ = ["current", "enter", "install_end_check", "remove_end_check"]

# Phase kinds, in the code the stall watchdog carries for them.
KINDS = ("start", "fit", "evaluate", "predict", "script end")
_COUNTS: collections.Counter = collections.Counter()
_STATE = {"description": "the start of the script"}
_FRAMEWORK_DIRS = tuple(
    os.sep + name + os.sep
    for name in ("transparent_dist", "keras", "tf_keras", "tensorflow", "runpy", "importlib")
)


def user_site() -> str:
    """`file:line` of the innermost frame of the user's code on this stack."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in _FRAMEWORK_DIRS) and not name.startswith("<frozen"):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def current() -> str:
    """What this rank is doing, for messages: e.g. "fit #2 at train.py:40"."""
    return _STATE["description"]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _describe(phase: dict, shown: tuple = ()) -> str:
    if phase["kind"] == "script end":
        return f"the end of the script (after {phase['after']})"
    text = f"{phase['kind']} #{phase['index']} at {phase['site']}"
    arguments = ", ".join(f"{k}={v!r}" for k, v in phase["arguments"].items() if k in shown)
    return text + (f" with {arguments}" if arguments else "")


def enter(kind: str, arguments: dict | None = None, comm: Any = None) -> None:
    """Starts phase `kind` on this rank after checking that every rank starts
    the same phase with the same `arguments` (small values whose repr is
    stable); raises CollectiveError on every rank otherwise."""
    _COUNTS[kind] += 1
    phase = {
        "kind": kind,
        "index": _COUNTS[kind],
        "site": user_site(),
        "arguments": dict(arguments or {}),
        "after": _STATE["description"],
    }
    _STATE["description"] = _describe(phase)
    stall.enter_phase(KINDS.index(kind), phase["index"])
    comm = world.get().comm if comm is None else comm
    if comm is None:
        return
    stall.arrive("phase check")
    text = repr((kind, phase["index"], sorted(phase["arguments"].items())))
    digests = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([_digest(text)], np.int64), digests)
    if (digests == digests[0]).all():
        return
    # Rare path: every rank saw the same digests, so all take it together.
    phases = comm.allgather(phase)
    names = {name for p in phases for name in p["arguments"]}
    differing = tuple(
        name
        for name in sorted(names)
        if len({repr(p["arguments"].get(name)) for p in phases if p["kind"] == kind}) > 1
    )
    lines = [f"rank {r}: {_describe(p, differing)}" for r, p in enumerate(phases)]
    if len(lines) > 8:
        lines = lines[:8] + [f"... ({len(lines) - 8} more ranks)"]
    raise CollectiveError(
        "transparent_dist: the ranks are not making the same calls in the same order "
        "(every rank must make the same fit / evaluate / predict calls with the same "
        "arguments): " + "; ".join(lines)
    )


def _end_check() -> None:
    from mpi4py import MPI

    from transparent_dist.core import failures

    if MPI.Is_finalized():  # the script ended MPI itself: nothing left to check with
        return
    try:
        enter("script end")
    except CollectiveError as error:
        failures.handle(CollectiveError, error, None)


def install_end_check() -> None:
    """Checks, when the interpreter exits normally, that every rank got there."""
    atexit.unregister(_end_check)
    atexit.register(_end_check)


def remove_end_check() -> None:
    atexit.unregister(_end_check)


# Bits of the flags ranks agree on after each training step (the lower bits
# belong to the checkpointer: a signal asked for one, one is due).
STOP = 4


def agree_to_stop(stopping: bool, flags: int, where: str) -> int:
    """The OR over ranks of `flags`, with STOP set if any rank is `stopping`
    (its `model.stop_training`): a rank that left the training loop alone
    would leave the others waiting in the next gradient exchange."""
    w = world.get()
    flags = collectives.any_flags(flags | (STOP if stopping else 0), w.comm)
    if flags & STOP and w.comm is not None:
        stoppers = [r for r, s in enumerate(w.comm.allgather(bool(stopping))) if s]
        if len(stoppers) < w.size and w.is_root:
            log.warning(
                f"rank(s) {', '.join(map(str, stoppers[:8]))} stopped training at {where} "
                "(model.stop_training); every rank stops there, since all must train the "
                "same steps"
            )
    return flags
