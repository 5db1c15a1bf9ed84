"""tf_keras (Keras 2, TF_USE_LEGACY_KERAS=1) gets the Keras 3 treatment."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import JOBS, background, background_result, job_env, load_ranks, run

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "tf_keras_fit.py")


# The one-process reference, in the background lane (conftest.background).
REFERENCE = background(
    "tf_keras-reference",
    __file__,
    lambda out: [SCRIPT, str(out), "reference", "2"],
    TF_USE_LEGACY_KERAS="1",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = job_env(TF_USE_LEGACY_KERAS="1")
    out = tmp_path_factory.mktemp("tf_keras")
    run(["-m", "transparent_dist", SCRIPT, str(out), "plugin"], ranks=2, env=env).check()
    run([SCRIPT, str(out), "control"], ranks=2, env=env).check()
    background_result("tf_keras-reference").check()
    return {
        "dir": out,
        "plugin": load_ranks(out, "plugin", 2),
        "reference": load_ranks(REFERENCE, "reference", 1)[0],
        "control": load_ranks(out, "control", 2),
    }


def test_fit_equals_one_process_with_the_global_batch(results):
    reference = results["reference"]["same"]
    for result in results["plugin"]:
        same = result["same"]
        np.testing.assert_allclose(same["weights"], reference["weights"], atol=1e-5)
        for key, values in reference["history"].items():
            np.testing.assert_allclose(same["history"][key], values, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(same["evaluate"], reference["evaluate"], rtol=1e-5)
        np.testing.assert_allclose(same["predict"], reference["predict"], atol=1e-5)
        assert len(same["predict"]) == 37
    control = results["control"][0]["same"]
    assert np.abs(np.asarray(control["weights"]) - reference["weights"]).max() > 1e-3


def test_h5py_rows_train_as_arrays_of_one_process(results):
    reference = results["reference"]["rows_on_disk"]["weights"]
    for result in results["plugin"]:
        np.testing.assert_allclose(result["rows_on_disk"]["weights"], reference, atol=1e-5)


def test_ranks_from_different_starts_end_identical(results):
    plugin = [np.asarray(r["own_start"]["weights"]) for r in results["plugin"]]
    np.testing.assert_array_equal(plugin[0], plugin[1])
    control = [np.asarray(r["own_start"]["weights"]) for r in results["control"]]
    assert np.abs(control[0] - control[1]).max() > 1e-3


def test_files_on_rank_zero_only(results):
    directory = results["dir"]
    assert (directory / "plugin-rank0.weights.h5").exists()
    assert not (directory / "plugin-rank1.weights.h5").exists()
    assert (directory / "control-rank1.weights.h5").exists()  # without the plugin
    rows = list(csv.reader((directory / "plugin.csv").open()))
    assert rows[0][0] == "epoch" and [r[0] for r in rows[1:]] == ["0", "1"]


def test_rank_seeded_shuffle_uses_every_sample_once(results):
    seen = [r["shuffled_ids"] for r in results["plugin"]]
    assert set(seen[0]["ids"]).isdisjoint(seen[1]["ids"])
    assert set(seen[0]["ids"]) | set(seen[1]["ids"]) == set(range(300))
    assert all(s["max"] == 1.0 and s["global_max"] == 1.0 for s in seen)
    control = results["control"][0]["shuffled_ids"]
    assert len(control["ids"]) == 300  # without the plugin each rank takes all
