"""Where each rank of a `tdrun` job got to, for `tdrun` to judge a launcher's status.

```python
from transparent_dist.core import ledger
ledger.note("start")                 # a rank, as its script starts (TDRUN_LEDGER names the folder)
ledger.note("end", "0")              # ... as its script ends, with its status
print(ledger.judge("/tmp/x", 0))     # tdrun: None (no rank wrote there), or (what, status)
```

Open MPI's `mpiexec` (PRRTE 3.0) ends a job with exit status 0 when it
loses a node's daemon: the ranks left are killed mid-script, and the
launcher's status is never raised above 0, whether it noticed the lost
daemon by its connection or by its `ssh` ending (docs/ulfm_lost_node.json,
docs/elastic.md). Only the ranks can tell such an end from a finished
job: each notes its start and its end (with the script's status), one
small file each, in the folder `TDRUN_LEDGER` names (tdrun makes it). A
rank whose host cannot see the folder (another node, no shared file
system) notes nothing and is not judged. Outside tdrun (`TDRUN_LEDGER`
unset) nothing is written. A script that leaves by `os._exit(n)` (a
common way round a hang at interpreter exit) notes its end first
(`noting_os_exit`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ENV", "judge", "note", "noting_os_exit"]

ENV = "TDRUN_LEDGER"
# The launcher's own rank numbers: they do not change when a rank is lost
# and the world is rebuilt under ULFM (the plugin's world ranks do).
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def _rank() -> str | None:
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return os.environ[name]
    return None


def note(kind: str, detail: str = "") -> None:
    """Notes `kind` ('start', 'end') for this rank, with its host and
    `detail`; nothing outside a tdrun job or where the folder is not
    reachable (a note must never end a job)."""
    folder, rank = os.environ.get(ENV), _rank()
    if not folder or rank is None or not os.path.isdir(folder):
        return
    try:
        Path(folder, f"{rank}.{kind}").write_text(f"{socket.gethostname()}\n{detail}\n")
    except OSError:
        pass


@contextlib.contextmanager
def noting_os_exit() -> Iterator[None]:
    """Within: `os._exit(n)` notes this rank's end with `n` before it
    leaves (it skips everything else, the end note after the script too).
    The original is `os._exit` again after, and inside as `__wrapped__`."""
    if not os.environ.get(ENV):
        yield
        return
    original = os._exit

    def leave(status: int) -> None:
        note("end", str(status))
        original(status)

    leave.__wrapped__ = original  # type: ignore[attr-defined]
    os._exit = leave
    try:
        yield
    finally:
        os._exit = original


def _read(folder: str) -> dict[str, dict[int, str]]:
    """{kind: {rank: host}} of the notes in `folder`."""
    notes: dict[str, dict[int, str]] = {"start": {}, "end": {}}
    for path in Path(folder).glob("*.*"):
        rank, _, kind = path.name.partition(".")
        if kind in notes and rank.isdigit():
            notes[kind][int(rank)] = path.read_text().partition("\n")[0]
    return notes


def _ranks_on_hosts(hosts_of: dict[int, str]) -> str:
    hosts: dict[str, list[int]] = {}
    for rank in sorted(hosts_of):
        hosts.setdefault(hosts_of[rank], []).append(rank)
    return ", ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} (on {host})"
        for host, ranks in hosts.items()
    )


def judge(folder: str, status: int, hint: str = "") -> tuple[str, int] | None:
    """`(what went wrong, the status tdrun exits with)` when ranks started
    and none reached the end of its script nor failed in it (a failure the
    plugin ends the job for notes an end: `world.abort`), or None (the
    launcher's status stands, and nothing is said; so for a job whose
    ranks, or the survivors of a lost rank under ULFM, ended their
    scripts). Status 0 so is Open MPI after a lost node: 1. Another status
    so is a rank killed (a signal, the out-of-memory killer, a lost node)
    and the launcher ending the job: its status, and `hint` (how the
    survivors could go on)."""
    if not os.path.isdir(folder):
        return None
    notes = _read(folder)
    if not notes["start"] or notes["end"]:
        return None
    started = _ranks_on_hosts(notes["start"])
    if status == 0:
        return (
            f"the launcher exited with status 0, but {started} ended before the end of the "
            "script: Open MPI ends a job so when it loses a node's daemon (a lost node: its "
            "message above names the node)",
            1,
        )
    return (
        f"the launcher exited with status {status} and no rank reached the end of its script "
        "or failed in it: a rank was killed (a signal, the out-of-memory killer, a lost node; "
        "the launcher's message above names it) and the launcher ended the others" + hint,
        status,
    )
