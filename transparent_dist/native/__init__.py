"""The native gradient exchange: a TensorFlow op that calls MPI itself.

```python
import tensorflow as tf
from transparent_dist import native
if native.load():                      # builds once per TF version, then cached
    mean, = native.allreduce([tf.ones(3)], weight=1.0)
```

`exchange_op.cc` is compiled on first use with the C++ compiler (`$CXX`,
else `g++`) against TensorFlow's own headers into a cache directory
(`$TD_CACHE_DIR`, else `$XDG_CACHE_HOME/transparent_dist`, else
`~/.cache/transparent_dist`), keyed by the source and TensorFlow build, so
the compiler runs once per machine image (~7 s). `python -m transparent_dist
build` does it ahead of a job. MPI is not linked at build time: the op gets
the function addresses and handles of the MPI library mpi4py loaded, so it
always talks to the same MPI, on the same communicator, as the Python side.

`TD_NATIVE=auto` (the default) falls back to the numpy exchange in
`collectives` with one warning if the op cannot be built or loaded on some
rank (every rank then takes the fallback); `on` makes that an error; `off`
always uses the fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transparent_dist import config, log, timeline, world

SOURCE = Path(__file__).with_name("exchange_op.cc")
# Float dtypes the op reduces (others go through the numpy exchange).
DTYPES = ("float32", "float64", "float16", "bfloat16")
WIRES = {"none": "same", "fp16": "fp16", "bf16": "bf16"}
_SPAN_NAMES = ("wait", "exchange", "metrics")


class NativeBuildError(RuntimeError):
    """The native exchange could not be compiled."""


_STATE: dict[str, Any] = {"tried": False, "module": None, "lib": None, "reason": ""}


def cache_dir() -> Path:
    explicit = os.environ.get("TD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transparent_dist"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    return compiler


def _build_command(output: Path) -> list[str]:
    import tensorflow as tf

    return [
        _compiler(),
        "-shared",
        "-fPIC",
        "-O2",
        "-Wno-deprecated-declarations",
        str(SOURCE),
        "-o",
        str(output),
        *tf.sysconfig.get_compile_flags(),
        *tf.sysconfig.get_link_flags(),
    ]


def library_path() -> Path:
    """Where the built op for this source and TensorFlow lives."""
    import tensorflow as tf

    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (tf.__version__, tf.__file__, _compiler(), *_build_command(Path("x"))):
        key.update(part.encode())
    return cache_dir() / f"exchange_op-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compiles the op unless a build for this TensorFlow is cached; returns
    its path. Safe to run from many ranks at once: one compiles, under a
    file lock, and the file appears atomically."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        with contextlib.suppress(OSError):  # file systems without flock: the rename still holds
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        partial = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.partial")
        log.info(f"building the native gradient exchange (once) into {path}", once=True)
        try:
            proc = subprocess.run(
                _build_command(partial), capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise NativeBuildError(f"compiler did not run: {error}") from None
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise NativeBuildError(
                f"compiling {SOURCE.name} failed:\n{(proc.stderr or proc.stdout)[-2000:]}"
            )
        os.replace(partial, path)
    return path


def _configure(lib: Any, comm: Any) -> None:
    import ctypes

    from mpi4py import MPI

    # dlsym on mpi4py's extension finds the MPI library it is linked to.
    mpi = ctypes.CDLL(MPI.__file__)

    def address(name: str) -> int:
        return ctypes.cast(getattr(mpi, name), ctypes.c_void_p).value

    lib.td_configure.argtypes = [ctypes.c_ssize_t] * 8
    lib.td_configure.restype = ctypes.c_int
    handles = [
        address("MPI_Allreduce"),
        address("MPI_Op_create"),
        MPI._handleof(comm),
        MPI._handleof(MPI.FLOAT),
        MPI._handleof(MPI.DOUBLE),
        MPI._handleof(MPI.UINT16_T),
        MPI._handleof(MPI.SUM),
        int(MPI.IN_PLACE),
    ]
    code = lib.td_configure(*handles)
    if code != 0:
        raise RuntimeError(f"MPI_Op_create failed with code {code}")
    lib.td_counters.argtypes = [ctypes.POINTER(ctypes.c_double)]
    lib.td_take_spans.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    lib.td_arrivals.restype = ctypes.c_int64
    lib.td_record_spans(1 if timeline.recording() else 0)


def _load_here(comm: Any) -> None:
    import ctypes

    import tensorflow as tf

    path = build()
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
    try:
        _load_here(w.comm)
    except Exception as error:  # noqa: BLE001 - any failure means the fallback
        failure = f"{type(error).__name__}: {error}"
    failures = [f for f in w.comm.allgather(failure) if f]
    if not failures:
        timeline.add_source(_Source())
        from transparent_dist import stall

        stall.add_counter(lambda: int(_STATE["lib"].td_arrivals()), "gradient exchange")
        log.debug(f"native gradient exchange loaded from {library_path()}")
        return True
    _STATE["module"] = None
    _STATE["reason"] = failures[0]
    message = f"the native gradient exchange is not available ({failures[0]})"
    if mode == "on":
        raise RuntimeError(f"transparent_dist: TD_NATIVE=on, but {message}")
    if w.is_root:
        log.warning(f"{message}; using the slower numpy exchange (TD_NATIVE=off to silence)")
    return False


def status() -> str:
    """One line for `doctor`: whether the op is in use, and why not."""
    if config.SETTINGS.native == "off":
        return "numpy fallback (TD_NATIVE=off)"
    if _STATE["module"] is not None:
        return f"native op ({library_path()})"
    return f"numpy fallback ({_STATE['reason'] or 'not loaded yet'})"


def allreduce(
    tensors: Sequence[Any],
    weight: Any = 1.0,
    *,
    average: bool = True,
    compression: str = "none",
    count_samples: bool = False,
    divided: bool = False,
) -> list[Any]:
    """Sums (average=False) or `weight`-weighted means of `tensors` (one
    dtype among DTYPES) over ranks, as one op; `load()` must be True.
    `divided`: the tensors were computed from a loss already divided by the
    number of ranks (see `gradients.divide_loss`)."""
    import tensorflow as tf

    return list(
        _STATE["module"].td_allreduce(
            weight=tf.cast(weight, tf.float64),
            tensors=list(tensors),
            wire=WIRES[compression],
            average=average,
            count_samples=count_samples,
            divided=divided,
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

    def spans(self) -> list[tuple[str, float, float]]:
        import ctypes

        out: list[tuple[str, float, float]] = []
        buffer = (ctypes.c_double * (3 * 4096))()
        while True:
            count = _STATE["lib"].td_take_spans(buffer, 4096)
            out.extend(
                (_SPAN_NAMES[int(buffer[3 * i])], buffer[3 * i + 1], buffer[3 * i + 2])
                for i in range(count)
            )
            if count < 4096:
                return out
