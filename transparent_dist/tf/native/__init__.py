"""The native gradient exchange: a TensorFlow op that calls MPI itself.

```python
import tensorflow as tf
from transparent_dist.tf import native
if native.load():                      # builds once per TF version, then cached
    mean, = native.allreduce([tf.ones(3)], weight=1.0)
```

`exchange_op.cc` is compiled on first use with the C++ compiler (`$CXX`,
else `g++`) against TensorFlow's own headers into a cache directory
(`$TD_CACHE_DIR`, else `$XDG_CACHE_HOME/transparent_dist`, else
`~/.cache/transparent_dist`), keyed by the source and TensorFlow build (not
the compiler, so nodes without one use an op built elsewhere), so the
compiler runs once per machine image (~7 s), by one rank per node while the
others wait. `python -m transparent_dist build` does it ahead of a job. The
cache is code that every rank will run: a library (or the cache directory)
that is not this user's, or that others can write, is refused, never
loaded; a failed build leaves a marker so later ranks fall back at once.
MPI is not linked at build time: the op gets
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
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transparent_dist.core import config, files, log, timeline, world

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


def _flags() -> list[str]:
    import tensorflow as tf

    return [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _build_command(output: Path) -> list[str]:
    return [
        _compiler(),
        "-shared",
        "-fPIC",
        "-O2",
        "-Wno-deprecated-declarations",
        str(SOURCE),
        "-o",
        str(output),
        *_flags(),
    ]


def library_path() -> Path:
    """Where the built op for this source and TensorFlow lives. The key does
    not name the compiler, so a compute node without one finds the op built
    on a login node."""
    import tensorflow as tf

    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (tf.__version__, tf.__file__, *_flags()):
        key.update(part.encode())
    return cache_dir() / f"exchange_op-{key.hexdigest()[:16]}.so"


def _refuse_unless_trusted(path: Path, directory: bool) -> None:
    # A library another user could write would run its code in every rank
    # the moment it is loaded.
    reason = files.untrusted(path, directory)
    if reason:
        raise NativeBuildError(
            f"refusing to load or build the native op: {path} {reason}; a library planted "
            "there would run in every rank. Use a cache directory only you can write "
            "(chmod 700, or TD_CACHE_DIR)"
        )


def _private_cache() -> Path:
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_unless_trusted(directory, directory=True)
    return directory


def failure_marker(path: Path) -> Path:
    """Where a failed build of `path` leaves the compiler's message, so
    that later ranks and jobs fall back at once instead of compiling again."""
    return path.with_suffix(".failed")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # O_NOFOLLOW: a symbolic link planted under the lock's name is refused,
    # never followed (and so never truncates what it points to).
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise NativeBuildError(
            f"the lock file {path} cannot be opened safely ({error.strerror}: a symbolic "
            "link there is refused, never followed)"
        ) from None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise NativeBuildError(f"the lock file {path} belongs to another user")
        with contextlib.suppress(OSError):  # no flock on this file system: the rename holds
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(retry: bool = False) -> Path:
    """Compiles the op unless a build for this TensorFlow is cached; returns
    its path. Safe to run from many ranks at once: one compiles, under a
    file lock, into a private temporary directory, and the file appears by
    rename. A failed build is remembered (`failure_marker`) unless `retry`."""
    path = library_path()
    directory = _private_cache()
    marker = failure_marker(path)
    if path.exists():
        _refuse_unless_trusted(path, directory=False)
        return path
    if marker.exists() and not retry:
        raise NativeBuildError(_read_marker(marker))
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            _refuse_unless_trusted(path, directory=False)
            return path
        if marker.exists() and not retry:
            raise NativeBuildError(_read_marker(marker))
        log.info(
            f"building the native gradient exchange (once for this TensorFlow, ~10 s) into {path}",
            once=True,
        )
        started = time.monotonic()
        _STATE["compiled"] = True  # for the fit summary (`load`), failed or not
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as private:
            partial = Path(private) / path.name
            try:
                proc = subprocess.run(
                    _build_command(partial), capture_output=True, text=True, timeout=600
                )
                failure = (
                    ""
                    if proc.returncode == 0
                    else f"exit status {proc.returncode}\n{(proc.stderr or proc.stdout)[-2000:]}"
                )
            except (OSError, subprocess.TimeoutExpired, NativeBuildError) as error:
                failure = f"the compiler did not run: {error}"
            if failure:
                message = f"compiling {SOURCE.name} failed; the compiler said:\n{failure}"
                _write_marker(marker, message)
                raise NativeBuildError(message)
            os.chmod(partial, 0o755)
            os.replace(partial, path)
            marker.unlink(missing_ok=True)
        _STATE["build_seconds"] = time.monotonic() - started
        log.info(f"native gradient exchange built in {_STATE['build_seconds']:.1f} s", once=True)
    return path


def _write_marker(marker: Path, message: str) -> None:
    with contextlib.suppress(OSError):
        files.write_atomically(str(marker), message.encode())


def _read_marker(marker: Path) -> str:
    try:
        text = marker.read_text()[-2000:]
    except OSError:
        text = "(unreadable)"
    return (
        f"its build failed before, and the failure is remembered in {marker} "
        f"(`python -m transparent_dist build` tries again): {text}"
    )


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


def _split_shared() -> int:
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


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
    node = w.comm.Split_type(_split_shared(), key=w.rank)
    try:
        if node.Get_rank() == 0:
            with contextlib.suppress(Exception):  # the same error comes again below
                build()
        node.Barrier()
        _load_here(w.comm)
    except Exception as error:  # noqa: BLE001 - any failure means the fallback
        failure = f"{type(error).__name__}: {error}"
    finally:
        node.Free()
    failures = [f for f in w.comm.allgather(failure) if f]
    # Inside a fit's first step: its summary leaves this time out.
    timeline.add_build(started, time.perf_counter(), bool(_STATE.get("compiled")))
    if not failures:
        timeline.add_source(_Source())
        from transparent_dist.core import stall

        stall.add_counter(lambda: int(_STATE["lib"].td_arrivals()), "gradient exchange")
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
