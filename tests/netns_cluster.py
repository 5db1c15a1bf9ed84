"""Two or three "nodes" on one machine, for tests and benchmarks of jobs
that span hosts: each node is a network namespace (with its own UTS
namespace, so its hostname differs) joined to a bridge by a veth link;
MPICH's Hydra starts each node's ranks through `ip netns exec`, and the
ranks talk TCP (libfabric's tcp provider) between nodes.

```python
from netns_cluster import Cluster
with Cluster(nodes=2) as cluster:            # root and `ip netns` needed
    command = cluster.mpiexec(ranks=4, per_node=2) + [python, "train.py"]
    cluster.kill_node(1)                     # every rank on node 1, SIGKILL
```

`Cluster.unavailable()` says why it cannot be made here (not root, no
`ip`, namespaces not permitted), for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_TAG = f"t{os.getpid() % 10000}"


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


class Cluster:
    """`nodes` namespaces `<tag>n<i>` at 10.<k>.<pid>.(10+i), a bridge at .1
    (each cluster of a process its own tag and subnet)."""

    _made = 0

    def __init__(self, nodes: int = 2) -> None:
        Cluster._made += 1
        self.nodes = nodes
        self.tag = f"{_TAG}{chr(ord('a') + Cluster._made % 26)}"
        self.bridge = f"{self.tag}br"
        self.subnet = f"10.{70 + Cluster._made % 50}.{os.getpid() % 250}"
        self.names = [f"node{i}" for i in range(nodes)]
        self.namespaces = [f"{self.tag}n{i}" for i in range(nodes)]
        self.addresses = [f"{self.subnet}.{10 + i}" for i in range(nodes)]
        self.directory = Path(tempfile.mkdtemp(prefix="netns-"))
        self.launcher = self.directory / "nsexec"

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be used here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            return "no `ip` / `unshare` (iproute2, util-linux)"
        probe = f"{_TAG}probe"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"network namespaces not permitted: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __enter__(self) -> Cluster:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            outside, inside = f"{self.tag}v{i}", f"{self.tag}p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("addr", "add", f"{address}/24", "dev", inside, netns=ns)
            _ip("link", "set", inside, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
        cases = "\n".join(
            f"  {address}|{name}) ns={ns}; name={name};;"
            for address, name, ns in zip(self.addresses, self.names, self.namespaces, strict=True)
        )
        # Hydra's ssh launcher runs `LAUNCHER [options] HOST COMMAND`.
        self.launcher.write_text(
            "#!/bin/bash\n"
            'while [[ "$1" == -* ]]; do shift; done\n'
            "host=$1; shift\n"
            f"case $host in\n{cases}\n"
            '  *) echo "nsexec: unknown host $host" >&2; exit 1;;\nesac\n'
            'exec ip netns exec $ns unshare --uts /bin/sh -c "hostname $name; exec $*"\n'
        )
        self.launcher.chmod(0o755)
        return self

    def __exit__(self, *exc: object) -> None:
        for i in range(self.nodes):
            self.kill_node(i)
            subprocess.run(["ip", "netns", "del", self.namespaces[i]], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def mpiexec(self, ranks: int, per_node: int, nodes: list[int] | None = None) -> list[str]:
        """An MPICH `mpiexec` command (without the program) for `ranks`
        ranks, `per_node` on each of `nodes` (default: all)."""
        chosen = range(self.nodes) if nodes is None else nodes
        hosts = ",".join(self.addresses[i] for i in chosen)
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        return [
            mpiexec,
            "-localhost",
            f"{self.subnet}.1",
            "-launcher",
            "ssh",
            "-launcher-exec",
            str(self.launcher),
            "-hosts",
            hosts,
            "-ppn",
            str(per_node),
            "-n",
            str(ranks),
        ]

    @staticmethod
    def environment() -> dict[str, str]:
        """What the ranks need: TCP between nodes (libfabric's tcp provider)."""
        return {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}

    def pids(self, node: int) -> list[int]:
        found = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True
        ).stdout.split()
        return [int(p) for p in found]

    def kill_node(self, node: int) -> None:
        """Every process in node `node`'s namespace, SIGKILLed: a lost node."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cut_link(self, node: int) -> None:
        """Takes node `node`'s link down: its ranks live on, unreachable."""
        _ip("link", "set", f"{self.tag}v{node}", "down")
