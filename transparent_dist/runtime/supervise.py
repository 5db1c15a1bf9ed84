"""`tdrun` over `mpiexec`: the launcher runs as a child, so that the job's end can be judged.

```python
from transparent_dist.runtime import supervise
status = supervise.run(["mpiexec", "-n", "4", "python", "-m", "transparent_dist", "train.py"])
```

Open MPI's `mpiexec` ends a job with status 0 when it loses a node's
daemon, its ranks killed mid-script; MPICH's (and Open MPI's without
ULFM) ends it when a rank is lost, killing the others before the plugin
can say how the job could have gone on. So tdrun does not hand its
process over to `mpiexec` (it does to srun): it makes a ledger folder
(`core/ledger`), passes its name to the ranks (`-x TDRUN_LEDGER` for Open
MPI; Hydra passes the whole environment), waits, and when no rank that
noted its start reached its script's end or failed in it, says so, with
the ranks and their hosts, how the survivors could have gone on (`hint`)
and where to resume from: exit status 1 for Open MPI's 0, the launcher's
otherwise (a signal's as a shell reports it, 128 + its number).

SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to tdrun are passed to the
launcher (a batch system's warning and end reach the job). SIGINT is not:
the terminal's Ctrl-C reaches the launcher itself (it is in tdrun's
process group), and a second copy would make Open MPI end the job without
its ranks' handlers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from transparent_dist.core import ledger

__all__ = ["run"]

_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _die_with_tdrun() -> None:
    """In the launcher's process before it starts: SIGTERM to it when tdrun
    dies (Linux `PR_SET_PDEATHSIG`), so that a tdrun killed outright
    (SIGKILL) does not leave the job running, as it did not when tdrun's
    process became the launcher's."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def run(command: list[str], open_mpi: bool = True, hint: str = "") -> int:
    """Runs the `mpiexec` `command` (launcher first; `open_mpi`: Open MPI's,
    which passes a variable on only when told, `-x`; MPICH's Hydra passes
    the whole environment) and returns the status tdrun exits with; `hint`
    ends the line said for a rank lost (`ledger.judge`)."""
    folder = tempfile.mkdtemp(prefix="tdrun-ledger-")
    if open_mpi:
        command = [command[0], "-x", ledger.ENV, *command[1:]]
    sys.stdout.flush()
    try:
        child = subprocess.Popen(
            command, env={**os.environ, ledger.ENV: folder}, preexec_fn=_die_with_tdrun
        )
        previous = {number: signal.getsignal(number) for number in (*_FORWARDED, signal.SIGINT)}
        for number in _FORWARDED:
            signal.signal(number, lambda number, frame: child.send_signal(number))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = child.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        status = 128 - status if status < 0 else status
        verdict = ledger.judge(folder, status, hint)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if verdict is None:
        return status
    from transparent_dist.core import elastic

    said, status = verdict
    sys.stderr.write(f"tdrun: {said}; {elastic.where_to_resume()}; exit status {status}\n")
    return status
