"""The MPI world: this process's rank, the job's size, and the communicators.

```python
from transparent_dist.core import world
w = world.get()
print(w.rank, w.size, w.local_rank, w.local_size)
```

MPI is started only when the process was started by an MPI launcher
(`mpiexec`, `mpirun`, `srun`), or when `TD_MPI=on`; a plain `python train.py`
gets a world of size 1 without importing `mpi4py` at all, so it behaves (and
costs) exactly like plain Keras.

This module owns the communicators (`Communicators`: training, data,
control and the watchdog's, one `World.comms`; `rebuild` replaces them) and
MPI's life: starting it, `abort`, the `at_finalize` callback, the library's
description. Everything sent or received on a communicator goes through
`collectives`, which counts each collective for the stall watchdog.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from transparent_dist.core import config

__all__ = [
    "Communicators",
    "World",
    "abort",
    "at_finalize",
    "expected_size",
    "forget_finalize",
    "free",
    "get",
    "is_finalized",
    "launched_by_mpi",
    "mpi_library",
    "rebuild",
    "reset",
    "split_by_node",
    "survives_lost_ranks",
    "thread_level",
    "yield_when_oversubscribed",
]

# Variables that launchers put in each rank's environment: MPICH / Intel MPI /
# Cray PMI (PMI_*), PMIx (Open MPI 5, srun --mpi=pmix), Open MPI, MVAPICH,
# HPE PALS (Perlmutter's mpiexec), Cray ALPS.
_LAUNCHER_VARIABLES = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "PALS_RANKID",
    "ALPS_APP_PE",
)


def launched_by_mpi(environ: dict | os._Environ | None = None) -> bool:
    """Whether this process looks like one rank of an MPI job."""
    env = os.environ if environ is None else environ
    if any(name in env for name in _LAUNCHER_VARIABLES):
        return True
    # A Slurm job step (srun) with several tasks: its ranks need MPI even when
    # the PMI plugin leaves no PMI_* variable behind.
    try:
        return "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Communicators:
    """The plugin's communicators, each a private duplicate of the job's
    (COMM_WORLD), so that a user's own MPI traffic never interleaves with
    ours and no two of our threads ever share one. All None in a world of
    size 1 started without MPI. `World.comms` holds the job's; `rebuild`
    replaces them."""

    # The training collectives: gradient exchange, broadcasts, agreement checks.
    training: Any = None
    # The data-loading threads': collectives from two threads must never
    # share a communicator, or their order could differ between ranks.
    data: Any = None
    # The phase checks (`phases`) and end-of-run gathers: a rank that checks
    # its phase while another waits in a training collective must never
    # pair the two (an Allgather of digests read as a pickle's size).
    control: Any = None
    # The stall watchdog's own messages (`stall`), which no collective
    # may ever receive.
    watchdog: Any = None

    @classmethod
    def duplicate(cls, parent: Any) -> Communicators:
        """Four duplicates of `parent` (collective on it: every rank calls
        it at the same point)."""
        return cls(*(parent.Dup() for _ in dataclasses.fields(cls)))

    def held(self) -> list[Any]:
        """The communicators held (none in a world of size 1 without MPI)."""
        comms = (getattr(self, field.name) for field in dataclasses.fields(self))
        return [comm for comm in comms if comm is not None]

    def free(self) -> None:
        """Frees every communicator (collective, like `duplicate`)."""
        for comm in self.held():
            comm.Free()


@dataclasses.dataclass(frozen=True)
class World:
    """Who this process is in the job, and the communicators it uses."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comms: Communicators = Communicators()
    # The size the job started with when ranks were lost since (`rebuild`);
    # 0 while none were.
    started_size: int = 0

    @property
    def comm(self) -> Any:
        """The training communicator (None without MPI)."""
        return self.comms.training

    @property
    def data_comm(self) -> Any:
        """The data-loading threads' communicator."""
        return self.comms.data

    @property
    def control_comm(self) -> Any:
        """The phase checks' communicator."""
        return self.comms.control

    @property
    def batch_ranks(self) -> int:
        """The ranks a script's per-rank batch is multiplied by for the
        global batch: the size the job started with, kept when ranks are
        lost, so the survivors share the same global batch."""
        return self.started_size or self.size

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD: World | None = None


# The ranks on this node as launchers tell them before MPI starts: Hydra
# (MPICH), Open MPI, HPE PALS, a Slurm step.
_LOCAL_SIZE_VARIABLES = (
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PALS_LOCAL_SIZE",
    "SLURM_STEP_TASKS_PER_NODE",
)


def yield_when_oversubscribed(environ: dict | os._Environ | None = None) -> bool:
    """Before MPI starts: when this node runs more ranks than it has cores,
    makes MPICH's waiting ranks sleep instead of spin
    (`MPIR_CVAR_ENABLE_HEAVY_YIELD=1`, unless the user set it), so a rank
    in a collective leaves its core to the rank it waits for: 3 ranks on 2
    cores train 2.5x faster (examples/mlp.py, 4,289 -> 10,834 samples/s);
    not oversubscribed, nothing changes. True if it was set."""
    env = os.environ if environ is None else environ
    cores = os.cpu_count() or 0
    for name in _LOCAL_SIZE_VARIABLES:
        try:
            local = int(str(env.get(name, "")).split("(")[0].split(",")[0])
        except ValueError:
            continue
        if cores and local > cores and "MPIR_CVAR_ENABLE_HEAVY_YIELD" not in env:
            env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] = "1"
            return True
        return False
    return False


def _start_mpi() -> World:
    import mpi4py

    # Ranks call MPI from TensorFlow's threads and the data pipeline's.
    mpi4py.rc.thread_level = "multiple"
    yield_when_oversubscribed()
    from mpi4py import MPI

    world = _over(MPI.COMM_WORLD)
    expected = expected_size()
    if expected > 1 and world.size == 1:
        raise RuntimeError(
            f"transparent_dist: this job was started as {expected} tasks, but MPI sees a world "
            "of 1: every task would train alone. Under srun, pass --mpi=pmi2 (the mpich "
            "wheel's ranks need it); otherwise mpi4py was built against another MPI than the "
            "launcher's (see the README: Using a system MPI)"
        )
    return world


def _over(parent: Any, started_size: int = 0) -> World:
    """The world of the ranks of `parent`, with fresh duplicates of it
    (collective on `parent`)."""
    node = split_by_node(parent)
    try:
        return World(
            rank=parent.Get_rank(),
            size=parent.Get_size(),
            local_rank=node.Get_rank(),
            local_size=node.Get_size(),
            comms=Communicators.duplicate(parent),
            started_size=started_size,
        )
    finally:
        free(node)


def split_by_node(comm: Any) -> Any:
    """A communicator of the ranks of `comm` on this node (collective on
    `comm`); the caller frees it (`free`)."""
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def free(comm: Any) -> None:
    """Frees a communicator made here (`split_by_node`); collective on it."""
    comm.Free()


def expected_size(environ: dict | os._Environ | None = None) -> int:
    """The number of tasks the launcher says it started (1 if it says none)."""
    env = os.environ if environ is None else environ
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"):
        try:
            return int(env[name])
        except (KeyError, ValueError):
            continue
    return 1


def get() -> World:
    """The world of this process, started on first use."""
    global _WORLD
    if _WORLD is None:
        mode = config.SETTINGS.mpi
        if mode == "on" or (mode == "auto" and launched_by_mpi()):
            _WORLD = _start_mpi()
        else:
            _WORLD = World()
    return _WORLD


def rebuild(parent: Any) -> Communicators:
    """Makes the world the ranks of `parent` (their rank, size and node),
    with fresh duplicates of it, and returns the communicators it replaces
    (the caller frees them once nothing uses them: `Communicators.free`).
    Collective on `parent`.

    The seam for continuing a job on fewer ranks (a communicator shrunk
    after a lost rank): everything that asks `get()` for a communicator
    after the call uses the new ones. What holds one across calls must be
    started again over the new world: the stall watchdog (`stall.stop`,
    `stall.start`), the native op (configured with the training
    communicator's handle) and the listener's pollers."""
    global _WORLD
    before = get()
    _WORLD = _over(parent, before.batch_ranks)
    return before.comms


def reset() -> None:
    """Forgets the world of a single process (`activation.reset`), so the
    next `get` reads the settings again. A world of several ranks is kept:
    another would need collective calls every rank makes at the same point
    (duplicating COMM_WORLD), its communicators may be held by compiled ops,
    and MPI, which is never finalized here, cannot start twice."""
    global _WORLD
    if _WORLD is not None and _WORLD.size == 1:
        _WORLD = None
    _EXIT.update(unsafe_finalize=False, status=0)


# After ranks were lost (ULFM), Open MPI's MPI_Finalize may wait forever
# for them (seen: a survivor that had written its results sat in
# ompi_mpi_finalize until the job was killed): such a process leaves
# without it, once every survivor has reached the script's end.
_EXIT: dict[str, Any] = {"unsafe_finalize": False, "status": 0}


def finalize_is_unsafe() -> None:
    """Says that this process must not call MPI_Finalize (ranks were lost)."""
    _EXIT["unsafe_finalize"] = True


def note_exit_status(status: int) -> None:
    """The status the script ends with (`python -m transparent_dist` knows it)."""
    _EXIT["status"] = status


def exit_if_finalize_is_unsafe() -> None:
    """At the very end (the last `atexit` handler, every rank at the script's
    end): when MPI_Finalize is unsafe, flushes every open file and leaves
    with the script's status instead of finalizing."""
    if not _EXIT["unsafe_finalize"]:
        return
    import gc
    import io

    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase) and not obj.closed:
            try:
                obj.flush()
            except (OSError, ValueError):
                pass
    os._exit(_EXIT["status"])


def abort(code: int = 1) -> None:
    """Ends every rank of the job now (MPI_Abort); plain exit without MPI.
    Notes this rank's end first (`ledger`: tdrun then knows the job ended
    for a reason the plugin said, not a lost rank)."""
    from transparent_dist.core import ledger

    ledger.note("end", f"abort {code}")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop the abort
            pass
    w = get()
    if w.comm is not None and w.size > 1:
        import time

        from mpi4py import MPI

        # The launcher forwards our output through a pipe; an abort kills it
        # all at once, so give the last lines (the reason) a moment to pass.
        time.sleep(1.0)
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


# The callback MPI_Finalize makes first (`at_finalize`), by its keyval.
_FINALIZE: dict[str, Any] = {"keyval": None, "callback": None}


def at_finalize(callback: Callable[[], None]) -> None:
    """Calls `callback()` first thing in MPI_Finalize, should the script
    finalize MPI itself (MPI is still usable then: attributes of COMM_SELF
    are deleted before anything else); once, and only in a job with MPI."""
    if _FINALIZE["keyval"] is not None or get().comm is None:
        return
    from mpi4py import MPI

    def on_delete(comm: Any, keyval: int, value: Any) -> None:
        hook = _FINALIZE["callback"]
        if hook is not None:
            hook()

    _FINALIZE["callback"] = callback
    _FINALIZE["keyval"] = MPI.Comm.Create_keyval(delete_fn=on_delete)
    MPI.COMM_SELF.Set_attr(_FINALIZE["keyval"], None)


def forget_finalize() -> None:
    """Takes the `at_finalize` callback off while Python can still run it
    (mpi4py finalizes MPI after the interpreter has shut down), without
    calling it."""
    keyval = _FINALIZE["keyval"]
    if keyval is None or is_finalized():
        return
    from mpi4py import MPI

    _FINALIZE["keyval"] = None
    _FINALIZE["callback"] = None  # deleting the attribute calls on_delete: make it a no-op
    MPI.COMM_SELF.Delete_attr(keyval)
    MPI.Comm.Free_keyval(keyval)


def is_finalized() -> bool:
    """Whether MPI has been finalized (by the script: we never do)."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    from mpi4py import MPI

    return bool(MPI.Is_finalized())


def mpi_library() -> tuple[str, str]:
    """(The MPI library mpi4py loads, mpi4py's version), asked without
    starting MPI when it has not started (MPI-3 allows it before MPI_Init)."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
    from mpi4py import MPI

    return MPI.Get_library_version().strip().splitlines()[0], mpi4py.__version__


def survives_lost_ranks() -> bool:
    """Whether this job's MPI goes on when a rank dies (ULFM): Open MPI with
    its fault tolerance on, as `mpiexec --with-ft ulfm` sets it
    (`mpi_ft_enable`). MPICH and Open MPI without it end the job."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    from mpi4py import MPI

    if not hasattr(MPI.Comm, "Shrink") or "Open MPI" not in MPI.Get_library_version():
        return False
    return os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes", "on")


def thread_level() -> str:
    """The thread support MPI gave this process (e.g. "multiple")."""
    from mpi4py import MPI

    return ["single", "funneled", "serialized", "multiple"][MPI.Query_thread()]
