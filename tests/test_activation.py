"""The three ways to turn the plugin on, and the plain single process."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import (
    JOBS,
    PYTHON,
    ROOT,
    background,
    background_result,
    job_env,
    load_ranks,
    run,
    run_together,
)


def _weights(directory, tag, ranks):
    return [np.asarray(r["weights"]) for r in load_ranks(directory, tag, ranks)]


# The one-process reference, in the background lane (conftest.background).
REFERENCE = background(
    "activation-reference",
    __file__,
    lambda out: [str(JOBS / "tiny_plain.py"), str(out), "reference", "40"],
)


@pytest.mark.mpi
def test_three_activation_forms_match_one_process(tmp_path):
    forms = {
        "zero-change": ["-m", "transparent_dist", str(JOBS / "tiny_plain.py")],
        "import-line": [str(JOBS / "tiny_import.py")],
        "aliases": [str(JOBS / "tiny_alias.py")],
    }
    background_result("activation-reference").check()
    reference = _weights(REFERENCE, "reference", 1)[0]
    for tag, command in forms.items():
        run([*command, str(tmp_path), tag, "20"], ranks=2).check()
        for rank, weights in enumerate(_weights(tmp_path, tag, 2)):
            np.testing.assert_allclose(weights, reference, atol=1e-5, err_msg=f"{tag} rank {rank}")
    # The control: the plain script under mpiexec trains each rank alone.
    run([str(JOBS / "tiny_plain.py"), str(tmp_path), "control", "20"], ranks=2).check()
    control = _weights(tmp_path, "control", 2)[0]
    assert np.abs(control - reference).max() > 1e-3


def test_single_process_without_mpi_is_plain_keras(tmp_path):
    """`python train.py` with the import line: no MPI, bit-identical results."""
    for job in run_together(
        dict(args=[str(JOBS / "tiny_plain.py"), str(tmp_path), "plain", "20"]),
        dict(args=[str(JOBS / "tiny_import.py"), str(tmp_path), "plugin", "20"]),
    ):
        job.check()
    plain = json.loads((tmp_path / "plain-rank0.json").read_text())
    plugin = json.loads((tmp_path / "plugin-rank0.json").read_text())
    assert plain == plugin


def test_importing_the_package_imports_neither_tensorflow_nor_mpi():
    code = (
        "import sys, transparent_dist as td; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'mpi4py') if m in sys.modules), td.size())"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], env=job_env(), capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip() == "[] 1"


def test_keras_is_patched_even_when_tensorflow_first_imports_it_mid_plugin_import():
    """TensorFlow's own import imports Keras (swallowing its ImportError);
    when that happens while a plugin module is still being imported, the
    Keras hook fails there, and must run again at the script's own
    `import keras` (it was lost: Keras unpatched, every rank alone)."""
    code = (
        "import transparent_dist\n"
        "from transparent_dist.tf import inputs\n"
        "import keras\n"
        "from keras.src.backend.tensorflow.trainer import TensorFlowTrainer\n"
        "from transparent_dist.core import patching\n"
        "print(patching.is_patched(TensorFlowTrainer, 'fit'))\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], env=job_env(), capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"


def test_patches_install_once_and_undo_cleanly():
    code = """
import keras
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.optimizers.base_optimizer import BaseOptimizer
originals = (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save)
import transparent_dist
from transparent_dist.core import patching
from transparent_dist.adapters import keras3_tensorflow
patched = (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save)
assert all(p is not o for p, o in zip(patched, originals))
assert all(p.__td_original__ is o for p, o in zip(patched, originals))
keras3_tensorflow.install(); transparent_dist.activate()   # again: nothing changes
assert (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save) == patched
transparent_dist.deactivate()
assert (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save) == originals
assert keras.saving.save_model is patching.original(keras.saving, "save_model")
print("ok")
"""
    out = subprocess.run(
        [PYTHON, "-c", code], env=job_env(), capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def _start_up_writers(stderr: str) -> set[str]:
    """The processes (their thread ids) that printed TensorFlow's oneDNN line."""
    return {
        line.split()[2] for line in stderr.splitlines() if "port.cc" in line and "oneDNN" in line
    }


@pytest.mark.mpi
def test_tensorflow_start_up_lines_come_from_rank_0_only():
    env = job_env()
    del env["TF_CPP_MIN_LOG_LEVEL"]  # as a user's shell has it
    code = ["-m", "transparent_dist", "-c", "import keras; print('imported')"]
    # A TF1 session's first run logs an MLIR note (C++ INFO) on each process.
    session = (
        "import tensorflow as tf\n"
        "graph = tf.Graph()\n"
        "with graph.as_default():\n"
        "    doubled = tf.constant(1.0) * 2\n"
        "with tf.compat.v1.Session(graph=graph) as s:\n"
        "    print('ran', s.run(doubled))\n"
    )
    quiet = run([*code[:-1], code[-1] + "\n" + session], ranks=2, env=env).check()
    assert quiet.stdout.count("imported") == 1
    assert len(_start_up_writers(quiet.stderr)) == 1, quiet.stderr
    mlir = {line.split()[2] for line in quiet.stderr.splitlines() if "mlir_graph" in line}
    assert len(mlir) == 1, quiet.stderr
    loud = run(code, ranks=2, env={**env, "TD_VERBOSE": "1"}).check()
    assert len(_start_up_writers(loud.stderr)) == 2, loud.stderr


def test_deactivate_forgets_all_state_and_activate_works_again():
    """In-process: `deactivate` undoes the patches and resets every
    module's state (`activation.reset`); `activate` then installs the
    adapters of the frameworks already imported, and a fit runs."""
    import keras
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    import transparent_dist
    from transparent_dist.core import log, loop_summary, patching, phases, progress, world

    transparent_dist.activate()  # on, whatever ran before in this process
    assert patching.is_patched(TensorFlowTrainer, "fit")
    first = world.get()
    log.info("said before the reset")
    loop_summary.step_ended("custom training loop", batch=2)
    phases.enter("fit")
    transparent_dist.deactivate()
    assert not patching.is_patched(TensorFlowTrainer, "fit")
    assert world._WORLD is None and log._SAID == set() and loop_summary._TALLIES == {}
    assert progress.current() == "the start of the script"

    transparent_dist.activate()
    assert patching.is_patched(TensorFlowTrainer, "fit")
    assert world.get() == first
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, verbose=0)
    assert len(history.history["loss"]) == 1


_REACTIVATE = """
import json, sys, threading
import numpy as np
import tensorflow as tf
import transparent_dist as td
from transparent_dist.core import world
from transparent_dist.tf import exchange

def ours():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("transparent_dist"))

exchange.prepare()  # the native op loaded, as a fit's start does
before, native = ours(), exchange.uses_native()
td.deactivate()
after = ours()
td.activate()
exchange.prepare()  # loaded again, on every rank at once
(mean,) = exchange.average([tf.fill([2], world.get().rank + 1.0)])
record = {"before": before, "after": after, "again": ours(), "native": [native,
          exchange.uses_native()], "mean": mean.numpy().tolist()}
with open(f"{sys.argv[1]}/rank{world.get().rank}.json", "w") as f:
    json.dump(record, f)
"""


@pytest.mark.mpi
def test_deactivate_stops_the_threads_and_activate_starts_them_on_every_rank(tmp_path):
    """2 ranks: deactivate() stops and joins the listener and watchdog
    threads and forgets the native op (the world is kept); activate() starts
    the threads again, the op loads again and averages, and the
    end-of-script check still passes."""
    run(["-c", _REACTIVATE, str(tmp_path)], ranks=2).check()
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["before"], record  # the listener at least
        assert record["after"] == [], record
        assert record["again"] == record["before"], record
        assert record["native"] == [True, True], record
        assert record["mean"] == [1.5, 1.5]


def test_a_keras_backend_without_an_adapter_is_refused_on_several_ranks(monkeypatch):
    import types

    from transparent_dist.runtime import activation

    jax_keras = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setattr(activation.world, "get", lambda: types.SimpleNamespace(size=2))
    with pytest.raises(RuntimeError) as refused:
        activation._on_keras(jax_keras)
    assert str(refused.value) == (
        "transparent_dist supports the TensorFlow backend of Keras; KERAS_BACKEND is 'jax'"
    )
    monkeypatch.setattr(activation.world, "get", lambda: types.SimpleNamespace(size=1))
    assert activation._on_keras(jax_keras) is None  # one process: plain Keras, no patches
