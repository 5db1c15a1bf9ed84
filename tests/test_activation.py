"""The three ways to turn the plugin on, and the plain single process."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import JOBS, PYTHON, ROOT, job_env, load_ranks, run


def _weights(directory, tag, ranks):
    return [np.asarray(r["weights"]) for r in load_ranks(directory, tag, ranks)]


@pytest.mark.mpi
def test_three_activation_forms_match_one_process(tmp_path):
    run([str(JOBS / "tiny_plain.py"), str(tmp_path), "reference", "40"]).check()
    reference = _weights(tmp_path, "reference", 1)[0]
    forms = {
        "zero-change": ["-m", "transparent_dist", str(JOBS / "tiny_plain.py")],
        "import-line": [str(JOBS / "tiny_import.py")],
        "aliases": [str(JOBS / "tiny_alias.py")],
    }
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
    run([str(JOBS / "tiny_plain.py"), str(tmp_path), "plain", "20"]).check()
    run([str(JOBS / "tiny_import.py"), str(tmp_path), "plugin", "20"]).check()
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


def test_patches_install_once_and_undo_cleanly():
    code = """
import keras
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.optimizers.base_optimizer import BaseOptimizer
originals = (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save)
import transparent_dist
from transparent_dist.core import patching
from transparent_dist.adapters import keras3
patched = (TensorFlowTrainer.fit, BaseOptimizer.apply, keras.Model.save)
assert all(p is not o for p, o in zip(patched, originals))
assert all(p.__td_original__ is o for p, o in zip(patched, originals))
keras3.install(); transparent_dist.activate()   # again: nothing changes
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
