"""Loading the native op into every rank (or none) and calling it.

```python
import tensorflow as tf
from transparent_dist.tf.native import op
if op.load():                          # collective: every rank, or none
    mean, = op.allreduce([tf.ones(3)], weight=1.0)
    totals = op.negotiate(2.0)         # once per step: sum of weights, ranks
    mean, = op.allreduce([tf.ones(3)], weight=2.0, totals=totals)
```

One rank per node builds the op (`build`) while the others wait. MPI is
not linked at build time: the op gets the function addresses and handles
of the MPI library mpi4py loaded, so it always talks to the same MPI, on
the same communicator, as the Python side. `TD_NATIVE=auto` (the default)
falls back to the numpy exchange in `collectives` with one warning if the
op cannot be built or loaded on some rank (every rank then takes the
fallback); `on` makes that an error; `off` always uses the fallback.

The ops are asynchronous: their MPI work runs on one communication thread
of the op's own, in the order the ops start, which TensorFlow's control
dependencies make program order (`exchange_op.cc` says why that order is
the same on every rank). That needs MPI_THREAD_MULTIPLE, which
`core.world` asks mpi4py for; under a lesser grant the work runs on the
calling thread, as a synchronous op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from transparent_dist.core import collectives, config, elastic, log, progress, timeline, world

# By name from the module: the package's `build` is the function.
from transparent_dist.tf.native.build import build as build_library
from transparent_dist.tf.native.build import compiled_here, library_path

__all__ = ["DTYPES", "WIRES", "allreduce", "load", "negotiate", "reset", "status"]

# Float dtypes the op reduces (others go through the numpy exchange).
DTYPES = ("float32", "float64", "float16", "bfloat16")
WIRES = {"none": "same", "fp16": "fp16", "bf16": "bf16"}
# The op's span kinds (exchange_op.cc's SpanKind): "queued" is a bucket from
# its op starting (its gradients exist) to the communication thread taking it.
_SPAN_NAMES = ("wait", "exchange", "metrics", "queued")
_SPAN_DOUBLES = 4  # kind, start, end, bucket

# Whether `load` ran, the loaded op (its TF module and its C functions),
# and why it is not in use.
_STATE: dict[str, Any] = {"tried": False, "module": None, "lib": None, "reason": ""}


def reset() -> None:
    """Forgets the loaded op (`activation.reset`): the next `load` loads it
    again, on every rank at once, as the first did. The library stays in
    the process (it cannot be unloaded); TensorFlow hands back the same op,
    with its counters, which are zeroed here."""
    if _STATE.get("lib") is not None:
        _STATE["lib"].td_reset_counters()
    _STATE.clear()
    _STATE.update(tried=False, module=None, lib=None, reason="")


def _configure(lib: Any, comm: Any) -> None:
    import ctypes

    lib.td_configure.argtypes = [ctypes.c_ssize_t] * 9
    lib.td_configure.restype = ctypes.c_int
    # The communication thread calls MPI while Python threads may too.
    threaded = world.thread_level() == "multiple"
    code = lib.td_configure(*collectives.native_handles(comm), int(threaded))
    if code != 0:
        raise RuntimeError(f"MPI_Op_create failed with code {code}")
    lib.td_counters.argtypes = [ctypes.POINTER(ctypes.c_double)]
    lib.td_take_spans.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    lib.td_arrivals.restype = ctypes.c_int64
    lib.td_record_spans(1 if timeline.recording() else 0)


def _reconfigure(comm: Any) -> None:
    """The op on the survivors' training communicator after a lost rank
    (`elastic.on_rebuild`): the traced steps keep calling the same op."""
    if _STATE.get("lib") is not None:
        _configure(_STATE["lib"], comm)


def _load_here(comm: Any) -> None:
    import ctypes

    import tensorflow as tf

    path = build_library()
    module = tf.load_op_library(str(path))
    lib = ctypes.CDLL(str(path))  # the same loaded object: its td_* functions
    _configure(lib, comm)
    _STATE["module"], _STATE["lib"] = module, lib


def load() -> bool:
    """Makes the op ready on every rank, or on none: True when gradients go
    through it. Collective on the first call (all ranks agree); cached."""
    if config.SETTINGS.native == "off":
        return False
    if _STATE["tried"]:
        return _STATE["module"] is not None
    _STATE["tried"] = True
    w = world.get()
    mode = config.SETTINGS.native
    if w.size == 1:
        _STATE["reason"] = "a single process"
        return False
    failure = ""
    started = time.perf_counter()
    # One rank per node compiles (when needed) while the others wait, so a
    # failing compiler runs once, not once per rank.
    node = world.split_by_node(w.comm)
    try:
        if collectives.rank_of(node) == 0:
            with contextlib.suppress(Exception):  # the same error comes again below
                build_library()
        collectives.barrier(node)
        _load_here(w.comm)
    except Exception as error:  # noqa: BLE001 - any failure means the fallback
        failure = f"{type(error).__name__}: {error}"
    finally:
        world.free(node)
    failures = [f for f in collectives.allgather_object(failure, w.comm, "agreement check") if f]
    # Inside a fit's first step: its summary leaves this time out.
    timeline.add_build(started, time.perf_counter(), compiled_here())
    if not failures:
        timeline.add_source(_Source())
        progress.add_counter(lambda: int(_STATE["lib"].td_arrivals()), "gradient exchange")
        elastic.on_rebuild(_reconfigure)
        log.debug(f"native gradient exchange loaded from {library_path()}")
        return True
    _STATE["module"] = None
    _STATE["reason"] = failures[0]
    # The reason may hold the compiler's lines: they go after the sentence.
    message = f"the native gradient exchange is not available: {failures[0]}"
    if mode == "on":
        raise RuntimeError(f"transparent_dist: TD_NATIVE=on, but {message}")
    if w.is_root:
        log.warning(
            "using the slower numpy exchange (TD_NATIVE=off to silence this): " + message.rstrip()
        )
    return False


def status() -> str:
    """One line for `doctor`: whether the op is in use, and why not."""
    if config.SETTINGS.native == "off":
        return "numpy fallback (TD_NATIVE=off)"
    if _STATE["module"] is not None:
        return f"native op ({library_path()})"
    return f"numpy fallback ({_STATE['reason'] or 'not loaded yet'})"


def negotiate(weight: Any, *, count_samples: bool = False) -> Any:
    """The step's totals over ranks, [sum of the weights, number of ranks]
    (a float64 tensor of 2), for every `allreduce` of the step: one round
    trip per step, which runs as soon as `weight` exists (the step's sample
    count: at the start of the step). `count_samples`: add `weight` to the
    op's sample counter (once per step)."""
    import tensorflow as tf

    return _STATE["module"].td_negotiate(
        weight=tf.cast(weight, tf.float64), count_samples=count_samples
    )


def allreduce(
    tensors: Sequence[Any],
    weight: Any = 1.0,
    *,
    average: bool = True,
    compression: str = "none",
    count_samples: bool = False,
    divided: bool = False,
    totals: Any = None,
    bucket: int = -1,
) -> list[Any]:
    """Sums (average=False) or `weight`-weighted means of `tensors` (one
    dtype among DTYPES) over ranks, as one op; `load()` must be True.
    `divided`: the tensors were computed from a loss already divided by the
    number of ranks (see `exchange.divide_loss`). `totals`: the step's
    `negotiate(weight)`, shared by its buckets (else negotiated here, and
    `count_samples` counted). `bucket`: its number in the step, for the
    timeline."""
    import tensorflow as tf

    weight = tf.cast(weight, tf.float64)
    if not average:
        totals = tf.zeros([2], tf.float64)
    elif totals is None:
        totals = negotiate(weight, count_samples=count_samples)
    return list(
        _STATE["module"].td_allreduce(
            weight=weight,
            totals=totals,
            tensors=list(tensors),
            wire=WIRES[compression],
            average=average,
            divided=divided,
            bucket=bucket,
        )
    )


class _Source:
    """The op's counters and spans, for `timeline`."""

    def counters(self) -> dict[str, float]:
        import ctypes

        values = (ctypes.c_double * 6)()
        _STATE["lib"].td_counters(values)
        names = (
            "exchange_seconds",
            "wait_seconds",
            "exchange_bytes",
            "exchanges",
            "samples",
            "reduce_seconds",
        )
        return dict(zip(names, values, strict=True))

    def reset(self) -> None:
        _STATE["lib"].td_reset_counters()

    def spans(self) -> list[tuple[str, float, float, dict]]:
        import ctypes

        out: list[tuple[str, float, float, dict]] = []
        width = _SPAN_DOUBLES
        buffer = (ctypes.c_double * (width * 4096))()
        while True:
            count = _STATE["lib"].td_take_spans(buffer, 4096)
            for i in range(count):
                kind, start, end, bucket = buffer[width * i : width * (i + 1)]
                args = {"bucket": int(bucket)} if bucket >= 0 else {}
                out.append((_SPAN_NAMES[int(kind)], start, end, args))
            if count < 4096:
                return out
