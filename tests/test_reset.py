"""`activation.reset`: every module holding plugin state can forget it,
and is listed where `deactivate` resets them all, in-process."""

from __future__ import annotations

import ast
import importlib
import signal
import types
from pathlib import Path

import numpy as np
import pytest

from transparent_dist.core import collectives, config, log, loop_summary, timeline, world
from transparent_dist.runtime import activation

PACKAGE = Path(__file__).resolve().parent.parent / "transparent_dist"

# Module-level state that is not forgotten by a `reset()`, and why.
UNDONE_OTHERWISE = {
    "transparent_dist.core.patching": "undo_all (deactivate): the patches",
    "transparent_dist.runtime.import_hook": "remove (deactivate): the finder, its callbacks",
    "transparent_dist.core.failures": "uninstall (deactivate): the exception hook",
    "transparent_dist.core.signals": "uninstall (deactivate): the handlers, the wake-up pipe",
    "transparent_dist.core.output": "restore (deactivate): standard output and logging",
    "transparent_dist.core.preemption": "handling_signals: held by a with block only",
    "transparent_dist.adapters.tf_keras": "_after_loss: Model's method, held by a with block only",
    "transparent_dist.core.config": "the user's settings (environment, configure())",
    "transparent_dist.runtime.activation": "_ACTIVE: deactivate's own flag",
    "transparent_dist.adapters.keras_steps": (
        "_COUNTED: a TF variable that traced steps capture (a new one would leave them "
        "reading the old)"
    ),
}
_MUTATORS = {"append", "add", "clear", "pop", "popleft", "update", "setdefault", "extend"}
_MUTATORS |= {"remove", "discard", "insert", "set", "appendleft"}
# Facts about the user's objects (what attributes stamped on them used to
# hold): they live and die with those objects, as the attributes did.
_WEAK = {"WeakKeyDictionary", "WeakSet", "WeakValueDictionary"}


def _module_state(path: Path) -> list[str]:
    """Module-level names that the module's code rebinds (`global`) or
    changes in place (items, attributes, mutating methods)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        weak = (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in _WEAK
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name) and not weak)
    changed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            changed.update(node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _MUTATORS and isinstance(node.func.value, ast.Name):
                changed.add(node.func.value.id)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if not isinstance(node, ast.AugAssign) else [node.target]
            for target in targets:
                base = target
                while isinstance(base, (ast.Subscript, ast.Attribute)):
                    base = base.value
                if base is not target and isinstance(base, ast.Name):
                    changed.add(base.id)
    return sorted(names & changed)


def _modules_with_state() -> dict[str, list[str]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        state = _module_state(path)
        if state:
            found[name] = state
    return found


def test_the_state_scan_finds_the_known_kinds_of_state():
    """The control for the next test: the scan sees dicts changed in place,
    rebound globals and thread lists."""
    found = _modules_with_state()
    assert "_SAID" in found["transparent_dist.core.log"]
    assert "_WORLD" in found["transparent_dist.core.world"]
    assert "_INSTALLED" in found["transparent_dist.core.patching"]


def test_every_module_holding_state_resets_it_or_says_why():
    unlisted = {
        name: state
        for name, state in _modules_with_state().items()
        if name not in activation.RESETS and name not in UNDONE_OTHERWISE
    }
    assert unlisted == {}, (
        "module state that deactivate() leaves behind: give the module a reset() and add it "
        "to activation.RESETS (or say in UNDONE_OTHERWISE what undoes it)"
    )


def test_every_listed_module_exists_and_has_reset():
    import tensorflow  # noqa: F401 - first, as scripts do: the adapters' import hook needs it

    for name in activation.RESETS:
        module = importlib.import_module(name)
        assert callable(getattr(module, "reset", None)), f"{name} has no reset()"
    assert len(set(activation.RESETS)) == len(activation.RESETS)
    # The world is read by the others' resets: it goes last.
    assert activation.RESETS[-1] == "transparent_dist.core.world"


# ------------------------------------------------------- what each forgets


def test_log_says_a_message_again_after_reset(capsys):
    log.reset()
    log.info("a message said once")
    log.info("a message said once")
    assert capsys.readouterr().err.count("a message said once") == 1
    log.reset()
    log.info("a message said once")
    assert capsys.readouterr().err.count("a message said once") == 1


def test_timeline_reset_forgets_what_restart_counters_keeps(monkeypatch, tmp_path):
    monkeypatch.setattr(config.SETTINGS, "timeline", str(tmp_path / "t"))
    timeline.reset()
    timeline.STATS.exchanges += 3
    timeline.add("exchange", 1.0, 2.0)
    timeline.restart_counters()  # a fit's start: its own counters, totals kept
    assert timeline.stats().exchanges == 0 and timeline.totals().exchanges == 3
    timeline.reset()
    assert timeline.totals().exchanges == 0
    assert timeline.take_events()[1] == []


def test_timeline_file_starts_afresh_after_reset(monkeypatch, tmp_path):
    import json

    from transparent_dist.core import timeline_file

    path = tmp_path / "trace.json"
    monkeypatch.setattr(config.SETTINGS, "timeline", str(path))
    timeline.reset()
    timeline_file.reset()
    timeline.add("before", 1.0, 2.0)
    timeline_file.write()
    assert timeline_file.written()
    timeline_file.reset()
    assert not timeline_file.written()
    timeline.add("after", 3.0, 4.0)
    timeline_file.write()
    names = [e["name"] for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert names == ["after"]


def test_loop_summary_forgets_the_steps():
    loop_summary.reset()
    loop_summary.step_ended("custom training loop", batch=8)
    assert loop_summary._TALLIES["custom training loop"].steps == 1
    loop_summary.reset()
    assert loop_summary._TALLIES == {}


def test_collectives_forget_buffers_but_results_stay_valid():
    from mpi4py import MPI

    out = collectives.allreduce_average([np.ones(3, np.float32)], 1.0, MPI.COMM_SELF)[0]
    before = collectives._BUFFERS
    collectives.reset()
    assert collectives._BUFFERS is not before
    collectives.allreduce_average([np.zeros(3, np.float32)], 1.0, MPI.COMM_SELF)
    collectives.allreduce_average([np.zeros(3, np.float32)], 1.0, MPI.COMM_SELF)
    np.testing.assert_array_equal(out, np.ones(3))  # not a buffer in use any more


def test_world_of_one_is_forgotten_a_world_of_many_kept(monkeypatch):
    one = world.get()
    assert one.size == 1
    world.reset()
    again = world.get()
    assert again is not one and again == one
    many = world.World(rank=1, size=4)
    monkeypatch.setattr(world, "_WORLD", many)
    world.reset()
    assert world.get() is many  # MPI's communicators and ops may hold it


def _held_signals():
    from transparent_dist.core import preemption

    block = preemption.handling_signals()
    block.__enter__()
    return block


def test_tf1_reset_gives_the_signal_handlers_back_and_forgets_sessions():
    from transparent_dist.adapters import tf1
    from transparent_dist.core import preemption

    before = signal.getsignal(signal.SIGTERM)
    # Held here too: dropping the last reference would also end the block
    # (the generator closes), which is no way to rely on.
    block = _held_signals()
    tf1._SESSIONS[1] = types.SimpleNamespace(_signals=block)
    tf1._SESSIONS[2] = None  # a session without preemption
    tf1._TRAIN_OPS.add("train_op")
    tf1._SKIPS["train_op"] = object()
    tf1._FED["checked"] = True
    assert signal.getsignal(signal.SIGTERM) is preemption._on_signal
    tf1.reset()
    assert signal.getsignal(signal.SIGTERM) is before, block
    assert tf1._SESSIONS == {} and tf1._TRAIN_OPS == set() and tf1._SKIPS == {}
    assert tf1._FED == {"checked": False}


def test_custom_loops_reset_gives_the_signal_handlers_back():
    from transparent_dist.adapters import custom_loops

    before = signal.getsignal(signal.SIGUSR1)
    block = _held_signals()
    custom_loops._LOOP["loop"] = types.SimpleNamespace(_signals=block)
    custom_loops._SEEN.update(dataset_iterated=True, warned=True)
    custom_loops.reset()
    assert signal.getsignal(signal.SIGUSR1) is before, block
    assert custom_loops._LOOP == {}
    assert custom_loops._SEEN == {"dataset_iterated": False, "warned": False}


def test_the_exchange_path_and_the_native_op_are_decided_again():
    from transparent_dist.tf import exchange
    from transparent_dist.tf.native import op

    assert op.load() is False  # one process: the numpy path, and why
    assert "a single process" in op.status()
    assert exchange.uses_native() is False
    exchange.reset()
    op.reset()
    assert exchange._PATH == {}
    assert op._STATE == {"tried": False, "module": None, "lib": None, "reason": ""}
    assert "not loaded yet" in op.status()


def test_fit_start_says_its_line_and_hint_again():
    from transparent_dist.adapters import fit_start

    fit_start._SAID.add("fit: 2 ranks x 32 samples per rank = global batch 64")
    fit_start._HINTED["done"] = True
    fit_start.reset()
    assert fit_start._SAID == set() and fit_start._HINTED == {"done": False}


def test_reset_skips_modules_never_imported(monkeypatch):
    import sys

    called = []
    fake = types.ModuleType("fake")
    fake.reset = lambda: called.append("fake")
    monkeypatch.setattr(activation, "RESETS", ("td_test_not_imported", "td_test_fake"))
    monkeypatch.setitem(sys.modules, "td_test_fake", fake)
    activation.reset()
    assert called == ["fake"] and "td_test_not_imported" not in sys.modules


@pytest.fixture(autouse=True)
def _leave_no_state(monkeypatch):
    yield
    for module in (loop_summary, timeline, log):
        module.reset()
