"""`tdrun` under Open MPI: the launcher runs as a child, so that its exit status can be judged.

```python
from transparent_dist.runtime import supervise
status = supervise.run(["mpiexec", "-n", "4", "python", "-m", "transparent_dist", "train.py"])
```

Open MPI's `mpiexec` ends a job with status 0 when it loses a node's
daemon, its ranks killed mid-script (`core/ledger`). So tdrun does not
hand the process over to it (as it does to MPICH's and srun, whose status
says a lost node): it makes a ledger folder, passes its name to the ranks
(`-x TDRUN_LEDGER`), waits, and when the launcher says 0 but no rank that
noted its start reached its script's end, it says so, names the ranks and
their hosts and where to resume from, and exits 1. Any other status is
passed on (a signal's as a shell reports it, 128 + its number).

SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to tdrun are passed to the
launcher (a batch system's warning and end reach the job). SIGINT is not:
the terminal's Ctrl-C reaches the launcher itself (it is in tdrun's
process group), and a second copy would make Open MPI end the job without
its ranks' handlers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from transparent_dist.core import ledger

__all__ = ["LOST_STATUS", "run"]

LOST_STATUS = 1
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run(command: list[str]) -> int:
    """Runs the Open MPI `command` (launcher first) and returns the status
    tdrun exits with."""
    folder = tempfile.mkdtemp(prefix="tdrun-ledger-")
    command = [command[0], "-x", ledger.ENV, *command[1:]]
    sys.stdout.flush()
    try:
        child = subprocess.Popen(command, env={**os.environ, ledger.ENV: folder})
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
        verdict = ledger.judge(folder, status)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if verdict is None:
        return status
    from transparent_dist.core import elastic

    sys.stderr.write(f"tdrun: {verdict}; {elastic.where_to_resume()}; exit status {LOST_STATUS}\n")
    return LOST_STATUS
