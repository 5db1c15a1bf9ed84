"""Buffer-level MPI collectives on numpy arrays: the hot path of the plugin.

```python
import numpy as np
from transparent_dist.core import collectives, world
a, b = collectives.allreduce_average([np.ones(3, "f4"), np.ones((2, 2), "f4")],
                                     weight=1.0, comm=world.get().comm)
```

Every MPI call of the plugin is made here, on a communicator passed
explicitly (`world.get().comm`, `data_comm`, `control_comm`), and every
collective tells the stall watchdog it is entered (`progress.arrive`), except
on the data communicator: its collectives run on tf.data threads, which
prefetch as far ahead as each rank's buffers let them, so they are no part
of the one sequence every rank's collectives must follow (a stuck data thread
shows as its rank late in the next training collective). Point-to-point
messages (`send`, `recv`, `isend`) are not counted: ranks make different
numbers of them, inside a counted collective or on the watchdog's own
communicator.

The hot path moves raw buffers (`Allreduce`, `Bcast`, `Allgatherv` on numpy
memory), never pickles; the small object collectives (`allgather_object`,
`broadcast_object`, `gather_object`) pickle, and are for agreement checks and
end-of-run summaries. Arrays of one
dtype are fused into one contiguous buffer so a step costs one MPI call per
dtype, not one per variable. Fusion buffers are kept between calls (two per
layout, used in turn, so the arrays handed back from one step are never
overwritten while that step can still read them).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from transparent_dist.core import progress, timeline, world
from transparent_dist.core.errors import CollectiveError

__all__ = [
    "allgather_object",
    "allgather_records",
    "allgather_rows",
    "allreduce_average",
    "allreduce_in_place",
    "allreduce_sum",
    "allreduce_sum_array",
    "any_flags",
    "barrier",
    "broadcast",
    "broadcast_object",
    "check_agreement",
    "completed",
    "failed_ranks",
    "free",
    "gather_object",
    "is_process_failure",
    "isend",
    "missing_ranks",
    "native_handles",
    "probe",
    "rank_of",
    "recv",
    "revoke",
    "send",
    "shrink",
    "size_of",
    "together",
    "reset",
]

# Dtypes MPI reduces natively; 16-bit floats (gradient compression) are
# summed by a user-defined operation; anything else is reduced in float32.
_REDUCIBLE = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = {np.dtype(np.float16).str: "float16", "bfloat16": "bfloat16"}
_HALF_OPS: dict[str, Any] = {}


def _half_name(dtype: np.dtype) -> str | None:
    return "bfloat16" if dtype.name == "bfloat16" else _HALF.get(dtype.str)


def _half_sum(name: str) -> Any:
    """An MPI operation summing 16-bit floats carried as MPI_SHORT."""
    if name not in _HALF_OPS:
        from mpi4py import MPI

        dtype = np.dtype(np.float16) if name == "float16" else _bfloat16()

        def add(inbuf: Any, outbuf: Any, datatype: Any) -> None:
            out = np.frombuffer(outbuf, dtype=dtype)
            np.add(np.frombuffer(inbuf, dtype=dtype), out, out=out)

        _HALF_OPS[name] = MPI.Op.Create(add, commute=True)
    return _HALF_OPS[name]


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class _FusionBuffers:
    """Per-layout pairs of preallocated buffers, handed out alternately."""

    def __init__(self) -> None:
        self._pairs: dict[tuple, list[np.ndarray]] = {}
        self._turn: dict[tuple, int] = {}

    def get(self, dtype: np.dtype, size: int, tag: str) -> np.ndarray:
        key = (tag, dtype.str, dtype.name, size)
        pair = self._pairs.get(key)
        if pair is None:
            pair = [np.empty(size, dtype), np.empty(size, dtype)]
            self._pairs[key] = pair
            self._turn[key] = 0
        turn = self._turn[key]
        self._turn[key] = 1 - turn
        return pair[turn]


_BUFFERS = _FusionBuffers()


def reset() -> None:
    """Forgets the fusion buffers and the 16-bit sum operations
    (`activation.reset`). Arrays handed out earlier stay valid (numpy keeps
    their memory); the operations are dropped, not freed, since a
    collective on another thread could still be using one."""
    global _BUFFERS
    _BUFFERS = _FusionBuffers()
    _HALF_OPS.clear()


def _arrive(label: str, comm: Any) -> None:
    """Counts a collective on `comm` for the watchdog (not on the data
    communicator: see the module's docstring)."""
    if comm is None or comm is not world.get().data_comm:
        progress.arrive(label)


def _exchange_dtype(dtype: np.dtype) -> np.dtype:
    if dtype in _REDUCIBLE or _half_name(dtype):
        return dtype
    return np.dtype(np.float32)


def _groups(arrays: Sequence[np.ndarray]) -> dict[np.dtype, list[int]]:
    """Indices of `arrays` by exchange dtype, in first-seen order (the same
    on every rank, since every rank passes the same layout)."""
    groups: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(_exchange_dtype(a.dtype), []).append(i)
    return groups


def _reduce_fused(
    arrays: Sequence[np.ndarray], comm: Any, weight: float | None, tag: str
) -> list[np.ndarray]:
    from mpi4py import MPI

    _arrive("gradient exchange" if weight is not None else "metric reduction", comm)
    started = time.perf_counter()
    groups = _groups(arrays)
    share = None
    if weight is not None and any(_half_name(d) for d in groups):
        # 16-bit sums of count-weighted gradients could overflow: scale each
        # rank's part by its share of the total weight first.
        total = comm.allreduce(weight, op=MPI.SUM)
        share = weight / total if total > 0 else 0.0
    out: list[np.ndarray] = [None] * len(arrays)  # type: ignore[list-item]
    moved = 0
    for dtype, members in groups.items():
        half = _half_name(dtype)
        total = sum(arrays[i].size for i in members)
        # One extra slot carries the sum of the ranks' weights.
        extra = 0 if weight is None or half else 1
        buf = _BUFFERS.get(dtype, total + extra, tag)
        offset = 0
        copy_start = time.perf_counter()
        scale = None if weight is None else (share if half else weight)
        for i in members:
            n = arrays[i].size
            source, target = arrays[i].reshape(-1), buf[offset : offset + n]
            if scale is None or scale == 1:
                np.copyto(target, source, casting="unsafe")
            elif scale == 0:
                # A rank with no samples this step: its gradient may be NaN
                # (a mean over nothing); it must contribute exactly zero.
                target[:] = 0
            else:
                # Weighted while copied: one pass over the gradients, not two.
                np.multiply(source, scale, out=target, casting="unsafe")
            offset += n
        if weight is not None and not half:
            buf[total] = weight
        reduce_start = time.perf_counter()
        timeline.add("copy", copy_start, reduce_start)
        if half:
            comm.Allreduce(MPI.IN_PLACE, [buf.view(np.uint16), MPI.SHORT], op=_half_sum(half))
        else:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        back_start = time.perf_counter()
        timeline.add("allreduce", reduce_start, back_start)
        if weight is not None and not half:
            weight_sum = buf[total]
            if weight_sum > 0:
                buf[:total] /= weight_sum
        offset = 0
        for i in members:
            a = arrays[i]
            view = buf[offset : offset + a.size].reshape(a.shape)
            out[i] = view if view.dtype == a.dtype else view.astype(a.dtype)
            offset += a.size
        moved += buf.nbytes
        timeline.add("copy back", back_start, time.perf_counter())
    ended = time.perf_counter()
    if weight is not None:
        timeline.add("exchange", started, ended)
        stats = timeline.STATS
        stats.exchange_seconds += ended - started
        stats.exchange_bytes += moved
        stats.exchanges += 1
    return out


def allreduce_average(arrays: Sequence[np.ndarray], weight: float, comm: Any) -> list[np.ndarray]:
    """The weighted mean over ranks: sum_r(w_r * a_r) / sum_r(w_r).

    `weight` is this rank's weight (its sample count for the step, or 1 for
    a plain mean). A rank with weight 0 contributes nothing, whatever its
    arrays hold. The returned arrays are views of a fusion buffer, valid
    until the call after next.
    """
    return _reduce_fused(arrays, comm, float(weight), "average")


def allreduce_sum(arrays: Sequence[np.ndarray], comm: Any) -> list[np.ndarray]:
    """Element-wise sums over ranks, fused per dtype."""
    return _reduce_fused(arrays, comm, None, "sum")


def broadcast(arrays: Sequence[np.ndarray], comm: Any, root: int = 0) -> list[np.ndarray]:
    """Rank `root`'s arrays on every rank, in one `Bcast` of raw bytes
    (so any dtype, bfloat16 and int64 counters included, travels as is)."""
    _arrive("broadcast", comm)
    arrays = [np.asarray(a, order="C") for a in arrays]
    sizes = [a.nbytes for a in arrays]
    buf = np.empty(sum(sizes), np.uint8)
    if comm.Get_rank() == root:
        offset = 0
        for a, n in zip(arrays, sizes, strict=True):
            buf[offset : offset + n] = a.reshape(-1).view(np.uint8)
            offset += n
    comm.Bcast(buf, root=root)
    out = []
    offset = 0
    for a, n in zip(arrays, sizes, strict=True):
        out.append(buf[offset : offset + n].view(a.dtype).reshape(a.shape).copy())
        offset += n
    return out


def allgather_rows(array: np.ndarray, comm: Any) -> np.ndarray:
    """The concatenation, in rank order, of every rank's `array` along axis
    0 (ranks may hold different numbers of rows, zero included)."""
    _arrive("gather", comm)
    array = np.asarray(array, order="C")
    rows = comm.allgather(int(array.shape[0]))
    row_size = int(np.prod(array.shape[1:], dtype=np.int64))
    out = np.empty((sum(rows),) + array.shape[1:], array.dtype)
    counts = [r * row_size * array.dtype.itemsize for r in rows]
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
    from mpi4py import MPI

    comm.Allgatherv(
        [array.reshape(-1).view(np.uint8), MPI.BYTE],
        [out.reshape(-1).view(np.uint8), (counts, displacements), MPI.BYTE],
    )
    return out


def allgather_records(record: np.ndarray, comm: Any, label: str = "gather") -> np.ndarray:
    """Every rank's `record` (a small 1-D array, of the same length and
    dtype on every rank) as rows of one array, in rank order: one
    `Allgather` of raw bytes."""
    _arrive(label, comm)
    record = np.ascontiguousarray(record)
    out = np.empty((comm.Get_size(), record.size), record.dtype)
    from mpi4py import MPI

    comm.Allgather([record.view(np.uint8), MPI.BYTE], [out.view(np.uint8), MPI.BYTE])
    return out


def allreduce_sum_array(array: np.ndarray, comm: Any) -> np.ndarray:
    """The element-wise sum over ranks of one array, in a new array (not a
    fusion buffer: the result may outlive later calls). 16-bit floats are
    summed as they are; dtypes MPI cannot reduce, in float64."""
    _arrive("gradient exchange", comm)
    from mpi4py import MPI

    array = np.ascontiguousarray(array)
    half = _half_name(array.dtype)
    if half:
        out = np.empty_like(array)
        comm.Allreduce(
            [array.view(np.uint16), MPI.SHORT], [out.view(np.uint16), MPI.SHORT], op=_half_sum(half)
        )
        return out
    if array.dtype in _REDUCIBLE:
        out = np.empty_like(array)
        comm.Allreduce(array, out, op=MPI.SUM)
        return out
    wide = array.astype(np.float64)
    comm.Allreduce(MPI.IN_PLACE, wide, op=MPI.SUM)
    return wide.astype(array.dtype)


def any_flags(flags: int, comm: Any) -> int:
    """The bitwise OR of every rank's `flags` (a small int), on every rank."""
    if comm is None:
        return flags
    from mpi4py import MPI

    _arrive("agreement check", comm)
    buf = np.array([flags], np.int32)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.BOR)
    return int(buf[0])


def allreduce_in_place(
    array: np.ndarray, comm: Any, op: str = "sum", label: str = "a collective"
) -> None:
    """Reduces a contiguous numpy `array` over ranks in place, by `op`
    ("sum" or "max")."""
    from mpi4py import MPI

    _arrive(label, comm)
    comm.Allreduce(MPI.IN_PLACE, array, op={"sum": MPI.SUM, "max": MPI.MAX}[op])


def allgather_object(value: Any, comm: Any, label: str = "gather") -> list[Any]:
    """Every rank's `value` (small, picklable), in rank order; `[value]`
    without a communicator."""
    if comm is None:
        return [value]
    _arrive(label, comm)
    return comm.allgather(value)


def gather_object(value: Any, comm: Any, root: int = 0, label: str = "gather") -> list[Any] | None:
    """Every rank's `value` in rank order on rank `root`, None elsewhere;
    `[value]` without a communicator."""
    if comm is None:
        return [value]
    _arrive(label, comm)
    return comm.gather(value, root=root)


def broadcast_object(value: Any, comm: Any, root: int = 0, label: str = "broadcast") -> Any:
    """Rank `root`'s `value` (small, picklable) on every rank; `value`
    itself without a communicator."""
    if comm is None:
        return value
    _arrive(label, comm)
    return comm.bcast(value, root=root)


def barrier(comm: Any, label: str = "a collective") -> None:
    """Waits until every rank of `comm` is here (nothing without one)."""
    if comm is None:
        return
    _arrive(label, comm)
    comm.Barrier()


def rank_of(comm: Any) -> int:
    """This process's rank in `comm`."""
    return comm.Get_rank()


def size_of(comm: Any) -> int:
    """The number of ranks in `comm`."""
    return comm.Get_size()


def send(array: np.ndarray, dest: int, tag: int, comm: Any) -> None:
    """Sends a numpy `array` to rank `dest` (point to point: not counted)."""
    comm.Send(array, dest=dest, tag=tag)


def recv(array: np.ndarray, source: int, tag: int, comm: Any) -> None:
    """Receives into a numpy `array` from rank `source` (not counted)."""
    comm.Recv(array, source=source, tag=tag)


def isend(array: np.ndarray, dest: int, tag: int, comm: Any) -> Any:
    """Starts sending `array` to `dest` (not counted); the array must live
    until `completed(request)`."""
    return comm.Isend(array, dest=dest, tag=tag)


def completed(request: Any) -> bool:
    """Whether a send started by `isend` has completed."""
    return bool(request.Test())


def probe(tag: int, comm: Any) -> int | None:
    """The rank whose message with `tag` waits to be received, or None (does
    not wait)."""
    from mpi4py import MPI

    status = MPI.Status()
    if comm.Iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
        return status.Get_source()
    return None


_CODE = re.compile(r"failed with code (\d+)")
_FAILURE_NAMES = (
    "MPI_ERR_PROC_FAILED",
    "MPI_ERR_REVOKED",
    "MPIX_ERR_PROC_FAILED",
    "MPIX_ERR_REVOKED",
)


def is_process_failure(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is MPI saying a rank was lost or
    a communicator revoked (ULFM): an `MPI.Exception` of that class, or the
    native op's or TensorFlow's message carrying its code or name."""
    if "mpi4py.MPI" not in sys.modules:
        return False
    from mpi4py import MPI

    classes = {
        getattr(MPI, name)
        for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
        if hasattr(MPI, name)
    }
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MPI.Exception) and error.Get_error_class() in classes:
            return True
        text = str(error)
        if any(name in text for name in _FAILURE_NAMES):
            return True
        match = _CODE.search(text)
        if match and _error_class(int(match.group(1))) in classes:
            return True
        error = error.__cause__ or error.__context__
    return False


def _error_class(code: int) -> int:
    from mpi4py import MPI

    try:
        return MPI.Get_error_class(code)
    except MPI.Exception:
        return -1


def revoke(comm: Any) -> None:
    """Revokes `comm` (ULFM's `MPI_Comm_revoke`): every pending and later
    call on it, on every rank, returns `MPI_ERR_REVOKED`. Not collective:
    it is how one rank wakes the others. Revoking twice is harmless."""
    from mpi4py import MPI

    try:
        comm.Revoke()
    except MPI.Exception:
        pass  # revoked already, or a communicator of failed ranks only


def shrink(comm: Any) -> Any:
    """A new communicator of the live ranks of `comm` (ULFM's
    `MPI_Comm_shrink`, fault-tolerant and collective over the survivors:
    every one gets the same group)."""
    return comm.Shrink()


def missing_ranks(comm: Any, shrunk: Any) -> list[int]:
    """The ranks of `comm` that are not in `shrunk` (its survivors)."""
    from mpi4py import MPI

    ranks = list(range(comm.Get_size()))
    found = MPI.Group.Translate_ranks(comm.Get_group(), ranks, shrunk.Get_group())
    return [r for r, there in zip(ranks, found, strict=True) if there == MPI.UNDEFINED]


def failed_ranks(comm: Any) -> list[int]:
    """The ranks of `comm` this process knows to have failed (ULFM; local
    knowledge, not agreed); empty if the library cannot say."""
    from mpi4py import MPI

    try:
        failed = comm.Get_failed()
        ranks = list(range(failed.Get_size()))
        return sorted(MPI.Group.Translate_ranks(failed, ranks, comm.Get_group()))
    except (MPI.Exception, NotImplementedError, AttributeError):
        return []


def free(comm: Any) -> None:
    """Frees a communicator made here (collective on it)."""
    comm.Free()


def native_handles(comm: Any) -> list[int]:
    """What compiled code needs to call MPI_Allreduce on `comm` itself, as
    integers: the addresses of MPI_Allreduce and MPI_Op_create in the MPI
    library mpi4py loaded, and the handles of `comm`, MPI_FLOAT,
    MPI_DOUBLE, MPI_UINT16_T, MPI_SUM and MPI_IN_PLACE."""
    import ctypes

    from mpi4py import MPI

    # dlsym on mpi4py's extension finds the MPI library it is linked to.
    library = ctypes.CDLL(MPI.__file__)

    def address(name: str) -> int:
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value

    return [
        address("MPI_Allreduce"),
        address("MPI_Op_create"),
        MPI._handleof(comm),
        MPI._handleof(MPI.FLOAT),
        MPI._handleof(MPI.DOUBLE),
        MPI._handleof(MPI.UINT16_T),
        MPI._handleof(MPI.SUM),
        int(MPI.IN_PLACE),
    ]


@contextlib.contextmanager
def together(what: str, comm: Any = None) -> Iterator[None]:
    """Runs the block on every rank; if it raised on any rank, every rank
    raises a CollectiveError with the first failing rank's message.
    Collective on `comm` (by default the training communicator).

    ```python
    with collectives.together(f"reading {path}"):
        header = read_header(path)    # an OSError on rank 2 -> the same error everywhere
    ```
    """
    w = world.get()
    comm = w.comm if comm is None else comm
    error: BaseException | None = None
    try:
        yield
    except (OSError, KeyError, ValueError, IndexError, TypeError) as caught:
        error = caught
    if w.size == 1:
        if error is not None:
            raise _as_collective(error, what) from error
        return
    messages = allgather_object(None if error is None else _message(error, what), comm)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        where = "" if len(failed) == w.size else f" (on rank {rank})"
        raise CollectiveError(message + where) from error


def _message(error: BaseException, what: str) -> str:
    if isinstance(error, CollectiveError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"transparent_dist: {what}: no such file: {error.filename or error}"
    return f"transparent_dist: {what}: {type(error).__name__}: {error}"


def _as_collective(error: BaseException, what: str) -> CollectiveError:
    return error if isinstance(error, CollectiveError) else CollectiveError(_message(error, what))


_SAME_SCRIPT = "every rank must run the same script on data of the same shape"


def check_agreement(what: str, value: Any, comm: Any, rule: str = _SAME_SCRIPT) -> None:
    """Raises the same CollectiveError (a ValueError) on every rank unless all ranks pass an
    equal `value` (a small, picklable description); the message names what
    differs on which ranks, and the `rule` they broke. Nothing to check
    without a communicator (a world of size 1)."""
    if comm is None:
        return
    values = allgather_object(value, comm, "agreement check")
    if all(v == values[0] for v in values[1:]):
        return
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if isinstance(value, dict):
        # Settings: only the entries that differ from rank 0's.
        first = _flat(values[0])
        lines = []
        for r in differing[:3]:
            other = _flat(values[r])
            keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            lines.append(
                f"rank 0 has {_entries(first, keys)} where rank {r} has {_entries(other, keys)}"
            )
    else:
        lines = [f"rank 0: {values[0]!r}"] + [f"rank {r}: {values[r]!r}" for r in differing[:3]]
    raise CollectiveError(
        f"transparent_dist: the ranks disagree on {what}; {rule}. " + "; ".join(lines)
    )


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf}."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _entries(flat: dict[str, Any], keys: list[str]) -> str:
    shown = ", ".join(f"{k}={flat.get(k, '(none)')!r}" for k in keys[:6])
    return shown + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")
