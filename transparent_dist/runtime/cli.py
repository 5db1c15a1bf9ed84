"""`python -m transparent_dist`: run a script, module or code with the plugin on.

```
mpiexec -n 4 python -m transparent_dist train.py --epochs 10
mpiexec -n 4 python -m transparent_dist -m mypackage.train --epochs 10
mpiexec -n 2 python -m transparent_dist -c "import keras; ..."
```

It behaves like the interpreter for the rest of the command line:
`sys.argv`, `__main__`, `__file__`, `sys.path[0]` and the exit status are
what the script would see without the plugin. A rank that raises or exits
with a non-zero status ends the whole job.
"""

from __future__ import annotations

import os
import runpy
import sys
import types

from transparent_dist.core import ledger

__all__ = ["USAGE", "main", "run"]

USAGE = """\
usage: python -m transparent_dist SCRIPT [ARGS...]
       python -m transparent_dist -m MODULE [ARGS...]
       python -m transparent_dist -c CODE [ARGS...]
       python -m transparent_dist doctor
       python -m transparent_dist build     (the native gradient exchange, ahead of a job)

Runs a Keras / TensorFlow program data-parallel over the ranks of the MPI
job it was started in (mpiexec, srun), with no change to its code.
"""


def _run_code(code: str, args: list[str]) -> None:
    sys.argv = ["-c", *args]
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drops the runner's own frames from the top of a traceback."""
    entry = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__main__.py")
    ours = {os.path.abspath(__file__), entry, os.path.abspath(runpy.__file__)}

    def is_ours(name: str) -> bool:
        return name == "<frozen runpy>" or os.path.abspath(name) in ours

    while tb is not None and is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run(argv: list[str]) -> int:
    """Runs the target named by `argv` (the interpreter's syntax)."""
    import transparent_dist
    from transparent_dist.core import failures, preemption, world

    transparent_dist.activate()
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                raise SystemExit("python -m transparent_dist -m: a module name is needed")
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            if len(argv) < 2:
                raise SystemExit("python -m transparent_dist -c: code is needed")
            _run_code(argv[1], argv[2:])
        else:
            path = argv[0]
            if not os.path.exists(path):
                print(f"python -m transparent_dist: can't open file {path!r}", file=sys.stderr)
                return 2
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(path))
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        code = _exit_code(stop.code)
        w = world.get()
        # A checkpointed preemption ends every rank alike: no abort needed.
        if code != 0 and w.size > 1 and not isinstance(stop, preemption.Preempted):
            # One rank leaving with an error would leave the others waiting.
            sys.stderr.write(
                f"transparent_dist: rank {w.rank} of {w.size} exited with status "
                f"{code}; ending all ranks of the job\n"
            )
            world.abort(code)
        world.note_exit_status(code)
        return code
    except BaseException as error:  # noqa: BLE001 - reported, then the job ends
        failures.handle(type(error), error, _user_traceback(error.__traceback__))
        return 1
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0].startswith("-") and argv[0] not in ("-m", "-c", "--version"):
        # `python -m transparent_dist --epochs 2 train.py`: never run a
        # "script" named --epochs.
        print(
            f"python -m transparent_dist: {argv[0]} is not an option here; the script's "
            "options go after its name (python -m transparent_dist train.py --epochs 2)",
            file=sys.stderr,
        )
        sys.exit(2)
    if argv[0] == "doctor":
        from transparent_dist.runtime import doctor

        sys.exit(doctor.main())
    if argv[0] == "build":
        from transparent_dist.tf import native

        print(native.build(retry=True))
        sys.exit(0)
    if argv[0] == "--version":
        from transparent_dist import __version__

        print(f"transparent_dist {__version__}")
        sys.exit(0)
    ledger.note("start")
    with ledger.noting_os_exit():
        status = run(argv)
    ledger.note("end", str(status))
    sys.exit(status)
