"""The phases every rank must enter alike, checked rather than trusted: each
`fit` / `evaluate` / `predict` call, the settings, the end of the script.

```python
from transparent_dist.core import phases, progress
phases.enter("fit", {"epochs": 3, "steps_per_epoch": None})   # in the fit patch
print(progress.current())      # "fit #1 at train.py:40"
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

Every check also carries the settings that must be alike on every rank
(`config.shared`): a `configure()` call made on one rank only is named at
the next phase. The checks run on a communicator of their own
(`World.control_comm`), so a rank checking its phase never pairs with a
training collective another rank waits in; the stall watchdog (`stall`)
sees such a rank (same collective number, another phase: `progress`) and
ends the job within seconds, naming both. A rank that ends its script (return,
`sys.exit()` with any status, falling off the end) or calls `MPI.Finalize()`
takes the end-of-script check, so it is named too.
"""

from __future__ import annotations

import atexit
import collections
import enum
import hashlib
import os
import sys
from typing import Any

import numpy as np

from transparent_dist.core import (
    collectives,
    config,
    failures,
    listener,
    log,
    loop_summary,
    progress,
    stall,
    world,
)
from transparent_dist.core.errors import CollectiveError

__all__ = [
    "agree_to_stop",
    "check_settings",
    "enter",
    "install_end_check",
    "remove_end_check",
    "reset",
]

_COUNTS: collections.Counter = collections.Counter()
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


# Exit status of a job whose settings are wrong (as for a command-line error).
SETTINGS_STATUS = 2


def check_settings() -> None:
    """Ends the job, from every rank alike, with one line per problem (from
    rank 0) and status 2 unless the `TD_*` settings are valid, none is a
    near miss of a known name (`TD_CHEKPOINT_DIR`), and every rank holds the
    same shared settings (`config.shared`): one rank with another
    `TD_BATCH_SIZE`, `TD_NATIVE` or `TD_CHECKPOINT_DIR` would issue other
    collectives, or other arithmetic, than the rest. Unknown names that are
    near nothing known are a warning."""
    w = world.get()
    problems = list(config.ERRORS)
    for name, close in config.unknown_names():
        if close is not None:
            problems.append(
                f"transparent_dist: {name} is not a setting (did you mean {close}?); "
                "a misspelt setting would be ignored"
            )
        else:
            log.info(f"{name} is not a setting of transparent_dist: ignored")
    if w.control_comm is not None:
        everyone = collectives.allgather_object(problems, w.control_comm, "agreement check")
        problems = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
        for p in problems:
            ranks = [r for r, rank_problems in enumerate(everyone) if p in rank_problems]
            if len(ranks) < w.size:
                problems[problems.index(p)] = f"{p} (on rank(s) {', '.join(map(str, ranks[:8]))})"
    if not problems:
        try:
            collectives.check_agreement(
                "settings that must be the same on every rank (TD_* variables, configure())",
                config.shared(),
                w.control_comm,
                "set them in the environment mpiexec / srun passes to every rank (not per "
                "node or per rank), or call configure() alike everywhere",
            )
            return
        except CollectiveError as error:
            problems = [str(error)]
    if w.is_root:
        sys.stderr.write("".join(p + "\n" for p in problems))
        sys.stderr.write(
            "transparent_dist: fix the setting(s) above (README: Settings); the job ends "
            f"with status {SETTINGS_STATUS}\n"
        )
        sys.stderr.flush()
    # Every rank ends here alike; the end-of-script phase would compare the
    # same differing settings again and end the job with another message
    # and status.
    _END["settings_failed"] = True
    raise SystemExit(SETTINGS_STATUS)


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
        "arguments": {**(arguments or {}), **config.shared()},
        "after": progress.current(),
    }
    progress.enter_phase(kind, phase["index"], _describe(phase))
    comm = world.get().control_comm if comm is None else comm
    if comm is None:
        return
    text = repr((kind, phase["index"], sorted(phase["arguments"].items())))
    record = np.array([_digest(text)], np.int64)
    digests = collectives.allgather_records(record, comm, "phase check")[:, 0]
    if (digests == digests[0]).all():
        return
    # Rare path: every rank saw the same digests, so all take it together.
    phases = collectives.allgather_object(phase, comm, "phase check")
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


_END: dict[str, Any] = {"done": False, "settings_failed": False}


def _end_check() -> None:
    """The end-of-script phase, once: at interpreter exit, or earlier when
    the script calls `MPI.Finalize()` itself (MPI is still usable in the
    callback MPI_Finalize makes first: `world.at_finalize`). The listener
    and the watchdog's threads stop after it, since nothing may call MPI
    once the script has finalized it."""
    if _END["done"]:
        return
    _END["done"] = True
    if world.is_finalized():
        return
    if _END["settings_failed"]:
        pass  # `check_settings` ended the job on every rank, and said why
    else:
        try:
            enter("script end")
        except CollectiveError as error:
            failures.handle(CollectiveError, error, None)
        else:
            # Every rank is here and MPI still works: the one safe point for
            # the end-of-run summaries' gathers (before the watchdog stops).
            loop_summary.at_script_end(world.get().control_comm)
    # The listener first: it may be in one of the watchdog's pollers.
    listener.stop()
    stall.stop()


def install_end_check() -> None:
    """Checks, when the interpreter exits normally or the script finalizes
    MPI, that every rank got there."""
    atexit.unregister(_atexit)
    atexit.register(_atexit)
    world.at_finalize(_end_check)


def _atexit() -> None:
    _end_check()
    world.forget_finalize()
    world.exit_if_finalize_is_unsafe()


def remove_end_check() -> None:
    atexit.unregister(_atexit)
    world.forget_finalize()


def reset() -> None:
    """Forgets the phases entered and takes the end check off
    (`activation.reset`): the next `fit` is #1 again."""
    remove_end_check()
    _COUNTS.clear()
    _END.update(done=False, settings_failed=False)


class Wish(enum.IntFlag):
    """What a rank wants after a training step; the ranks OR them in one
    collective (`agree_to_stop`), so all act alike on the next step."""

    EXIT = 1  # a signal asked for a checkpoint and exit (`preemption`)
    DUE = 2  # a timed checkpoint is due; rank 0's clock decides (`preemption`)
    STOP = 4  # the script stopped training (`model.stop_training`)


def agree_to_stop(stopping: bool, flags: int, where: str) -> int:
    """The OR over ranks of `flags`, with `Wish.STOP` set if any rank is `stopping`
    (its `model.stop_training`): a rank that left the training loop alone
    would leave the others waiting in the next gradient exchange."""
    w = world.get()
    flags = collectives.any_flags(flags | (Wish.STOP if stopping else 0), w.comm)
    if flags & Wish.STOP and w.comm is not None:
        everyone = collectives.allgather_object(bool(stopping), w.comm, "agreement check")
        stoppers = [r for r, s in enumerate(everyone) if s]
        if len(stoppers) < w.size and w.is_root:
            log.warning(
                f"rank(s) {', '.join(map(str, stoppers[:8]))} stopped training at {where} "
                "(model.stop_training); every rank stops there, since all must train the "
                "same steps"
            )
    return flags
