"""Surviving the walltime, for every kind of script: signal -> the ranks
agree at a step boundary -> rank 0 writes a checkpoint -> barrier -> every
rank exits with status 75; the next run resumes from it.

```python
from transparent_dist.core import preemption
service = preemption.Service.from_settings()      # None without TD_CHECKPOINT_DIR
if service is not None:
    with preemption.handling_signals():
        state = service.resume()                   # (arrays, meta) or None
        ...                                        # after each training step:
        service.step(lambda: (arrays, {"epoch": 0, "step": 1}))
```

The signals are Slurm's SIGTERM at the walltime and SIGUSR1
(`--signal=USR1@120`). The service is framework-neutral: the adapters give
it the step boundary and the state to save: the Keras callback
(`adapters.keras_callbacks.CheckpointAndResume`), the TF1 session hook
(`adapters.tf1`), and the optimizer's update in custom loops
(`adapters.custom_loops`). Periodic checkpoints (`TD_CHECKPOINT_EVERY`,
steps or seconds) take the same path.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from transparent_dist.core import checkpoint, collectives, config, log, phases, run_identity, world
from transparent_dist.core.collectives import together

__all__ = [
    "PREEMPTED_STATUS",
    "Preempted",
    "Service",
    "handling_signals",
    "requested",
]

# Exit status of a job that checkpointed on request: "temporary failure,
# try again" (EX_TEMPFAIL), so a batch script can requeue on it.
PREEMPTED_STATUS = 75

# The wishes the ranks OR after a step (`phases.Wish`, one enum for them all).
EXIT = phases.Wish.EXIT
DUE = phases.Wish.DUE


class Preempted(SystemExit):
    """Raised on every rank once the checkpoint asked for by a signal is
    written; the process exits with PREEMPTED_STATUS."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_STATUS)


State = Callable[[], tuple[list[np.ndarray] | None, dict]]


class Service:
    """One training run's checkpoints: resume, periodic saves, and the
    checkpoint-and-exit a signal asks for.

    Args:
        directory: where checkpoints go (`TD_CHECKPOINT_DIR`).
        every: "500" (steps), "600s" (seconds) or "" (`TD_CHECKPOINT_EVERY`).
        keep: how many checkpoints to keep (`TD_CHECKPOINT_KEEP`).
    """

    def __init__(self, directory: str, every: str = "", keep: int = 3) -> None:
        self.directory, self.keep = directory, keep
        self.every_steps, self.every_seconds = config.parse_every(every)
        self.global_step = 0
        # What this run is (`resume`'s `identity`), written into each checkpoint.
        self.identity: dict | None = None
        self._last_save = time.monotonic()

    @classmethod
    def from_settings(cls) -> Service | None:
        """The service `TD_CHECKPOINT_*` asks for, or None."""
        s = config.SETTINGS
        return (
            cls(s.checkpoint_dir, s.checkpoint_every, s.checkpoint_keep)
            if s.checkpoint_dir
            else None
        )

    def resume(
        self, identity: dict | None = None, limits: dict | None = None
    ) -> tuple[list[np.ndarray], dict] | None:
        """Proves the directory this user's alone and writable (before step
        1, not at the walltime), then returns the checkpoint every rank
        resumes from (rank 0 chooses), or None.

        `identity` (plain values: model, optimizer, data...) is what this
        run is; a checkpoint recording another is refused, naming what
        differs, unless `TD_RESUME` says otherwise (`_decide`). `limits`
        bound the numbers read back (`checkpoint.validate`)."""
        self.identity = identity
        with together(f"checking {self.directory}"):
            if world.get().is_root:
                checkpoint.probe(self.directory)
        state = checkpoint.load_agreed(self.directory)
        if state is not None and not self._decide(state, identity, limits):
            state = None
        if state is not None:
            meta = state[1]
            self.global_step = int(meta["global_step"])
            if meta.get("stopped") and limits and "epochs" in limits:
                # A callback had ended training (the checkpoint was written
                # at its end): the same command trains no further.
                meta["stopped_at"], meta["epoch"] = meta["epoch"], int(limits["epochs"])
        self._last_save = time.monotonic()
        return state

    def _decide(self, state: tuple[list, dict], identity: dict | None, limits: dict | None) -> bool:
        """Whether to resume `state`, decided by rank 0 for every rank: its
        numbers must be in bounds and its run this one. Otherwise
        `TD_RESUME` says: auto (the default) refuses, naming what differs;
        force resumes another run's checkpoint anyway (never one whose
        numbers are out of bounds); fresh sets the checkpoints aside and
        starts afresh."""
        arrays, meta = state
        w, setting = world.get(), config.SETTINGS.resume
        resume = True
        with together(f"resuming from {meta['path']}"):
            if w.is_root:
                resume = self._judge(meta, len(arrays), identity, limits, setting)
        if w.size > 1:
            resume = collectives.broadcast_object(resume, w.comm)
        return resume

    def _judge(
        self, meta: dict, arrays: int, identity: dict | None, limits: dict | None, setting: str
    ) -> bool:
        try:
            checkpoint.validate(meta, arrays, limits)
            differences = run_identity.differences(meta.get("identity"), identity)
        except checkpoint.CheckpointError as error:
            if setting != "fresh":
                raise
            problem = str(error)
        else:
            if not differences:
                return True
            problem = f"the checkpoint {meta['path']} is of another run: " + "; ".join(differences)
            if setting == "force":
                log.info(f"{problem}; resuming it anyway (TD_RESUME=force)", once=False)
                return True
            if setting != "fresh":
                raise checkpoint.CheckpointError(
                    f"{problem}. Resume it anyway with TD_RESUME=force, or set it aside and "
                    "start afresh with TD_RESUME=fresh (or give this run its own "
                    "TD_CHECKPOINT_DIR)"
                )
        moved = checkpoint.set_aside(self.directory)
        log.info(
            f"{problem}; TD_RESUME=fresh: training starts afresh, the checkpoints there "
            f"moved to {moved}",
            once=False,
        )
        return False

    def resume_replaying(self, variables: list[Any], assign: Callable, what: str) -> int:
        """`resume` for loops that start again from their first step (TF1
        sessions, custom loops): sets `variables` from the checkpoint with
        `assign(variable, value)` and returns the number of steps it holds,
        which the loop then runs without their update (0 without one)."""
        state = self.resume()
        if state is None:
            return 0
        arrays, meta = state
        check_shapes(arrays, variables, meta["path"])
        for variable, value in zip(variables, arrays, strict=True):
            assign(variable, value)
        log.info(
            f"resumed from {meta['path']}: the first {meta['global_step']} {what} run "
            "without their update (done before the checkpoint)",
            once=False,
        )
        return int(meta["global_step"])

    def wanted(self) -> int:
        """This rank's wish after a step (EXIT, DUE), to be OR-ed over ranks."""
        flags = EXIT if requested() else 0
        if (
            self.every_seconds
            and world.get().is_root
            and time.monotonic() - self._last_save >= self.every_seconds
        ):
            flags |= DUE
        return flags

    def due(self, flags: int) -> int:
        """The flags every rank agreed on after step `global_step`, with DUE
        added when a periodic checkpoint falls on this step."""
        if self.every_steps and self.global_step and self.global_step % self.every_steps == 0:
            flags |= DUE
        return flags

    def after_agreement(self, flags: int, state: State) -> None:
        """Acts on the flags every rank agreed on after step `global_step`:
        writes a checkpoint of `state()` if one is due or asked for, and
        exits every rank if a signal asked."""
        self.act(self.due(flags), state)

    def act(self, flags: int, state: State) -> None:
        """Writes a checkpoint of `state()` if `flags` ask for one (EXIT or
        DUE), then, for EXIT, exits every rank (all hold the same flags)."""
        if flags & (EXIT | DUE):
            self.save(state)
        if flags & EXIT:
            log.info(
                f"checkpoint written to {checkpoint.path_for(self.directory, self.global_step)}; "
                f"exiting with status {PREEMPTED_STATUS} (run the same command again to resume; "
                "further SIGTERM / SIGUSR1 are ignored)"
            )
            _ignore_further_signals()
            raise Preempted()

    def step(self, state: State, stopping: bool = False, where: str = "") -> int:
        """One step done (for adapters without a stop agreement of their
        own): counts it, agrees with the other ranks, acts. Returns the
        agreed flags (`phases.Wish.STOP` set if any rank stops)."""
        self.global_step += 1
        where = where or f"step {self.global_step}"
        flags = phases.agree_to_stop(stopping, self.wanted(), where)
        self.after_agreement(flags, state)
        return flags

    def save(self, state: State) -> None:
        """Rank 0 writes `state()` (arrays, meta); no rank goes on, or
        exits, before the checkpoint exists."""
        w = world.get()
        arrays, meta = state()
        meta = {"global_step": self.global_step, **meta}
        if self.identity is not None:
            meta["identity"] = self.identity
        if w.is_root:
            checkpoint.save(self.directory, arrays or [], meta, self.keep)
        collectives.barrier(w.comm)
        self._last_save = time.monotonic()


def values(variables: list[Any]) -> list[np.ndarray]:
    """The values of `variables` (TF variables, eagerly) as numpy arrays."""
    return [np.asarray(v.numpy()) for v in variables]


def check_shapes(arrays: list[np.ndarray], variables: list[Any], path: str) -> None:
    """Raises the same error on every rank unless `arrays` fit `variables`."""
    with together(f"resuming from {path}"):
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(a.shape) for a in arrays] != shapes:
            raise ValueError(
                f"the checkpoint {path} is not of this model: it holds "
                f"{len(arrays)} arrays of shapes {[tuple(a.shape) for a in arrays][:4]}..., "
                f"this model and optimizer have {len(variables)} variables of shapes "
                f"{shapes[:4]}... (a checkpoint directory of another run?)"
            )


_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_REQUESTED: dict[str, Any] = {"number": None}
_LOCK = threading.Lock()


def _on_signal(number: int, frame: Any) -> None:
    if _REQUESTED["number"] is None:
        sys.stderr.write(
            f"transparent_dist: {signal.Signals(number).name} received; a checkpoint "
            f"will be written at the next step, then the job exits\n"
        )
    _REQUESTED["number"] = number


def _ignore_further_signals() -> None:
    """Once the checkpoint is written the job's status is 75, however many
    more signals come (Slurm's, then a user's `scancel --signal`). Ignored
    by the kernel, not by a Python handler: Python puts its handlers back
    to the default (death) while it shuts down, when a late one still lands."""
    if threading.current_thread() is threading.main_thread():
        for number in _SIGNALS:
            signal.signal(number, signal.SIG_IGN)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """While the block runs (a fit that can checkpoint), SIGTERM and
    SIGUSR1 ask for a checkpoint and exit; before and after, the handlers
    that were there act (a script's own, or the end of the job). A signal
    that came too late to be acted on is delivered to them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _LOCK:
        previous = {number: signal.signal(number, _on_signal) for number in _SIGNALS}
        _REQUESTED["number"] = None
    acted = failed = False
    try:
        yield
    except Preempted:
        acted = True
        raise
    except BaseException:
        failed = True
        raise
    finally:
        with _LOCK:
            for number, handler in previous.items():
                if not acted:  # else ignored from the checkpoint on
                    signal.signal(number, handler)
            # A block that failed (the checkpoint write itself, say) ends the
            # job with its own traceback: a late signal delivered now would
            # end it first, with status 143 and no word of the cause.
            late = None if acted or failed else _REQUESTED["number"]
            _REQUESTED["number"] = None
        if late is not None:
            signal.raise_signal(late)


def requested() -> bool:
    """Whether this rank received a checkpoint-and-exit signal."""
    return _REQUESTED["number"] is not None
