"""Small parts on their own: sharding arithmetic, patch bookkeeping,
settings, the import hook, and the MPI buffer collectives on real ranks."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
from conftest import JOBS, load_ranks, run

from transparent_dist.core import config, patching
from transparent_dist.core.sharding import shard_range, steps_for
from transparent_dist.runtime import import_hook


def test_shard_range_example_from_the_issue():
    assert [shard_range(1000, r, 3) for r in range(3)] == [(0, 334), (334, 667), (667, 1000)]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 1000])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shard_range_covers_in_order_and_balanced(n, size):
    blocks = [shard_range(n, r, size) for r in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(blocks[i][1] == blocks[i + 1][0] for i in range(size - 1))
    lengths = [stop - start for start, stop in blocks]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the first n % size get one more


def test_shard_range_rejects_nonsense():
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError):
        shard_range(-1, 0, 1)


def test_round_robin_and_steps():
    assert steps_for(500, 48) == 11 and steps_for(480, 48) == 10


def test_patch_is_installed_once_and_undone():
    class Target:
        def greet(self):
            return "hi"

    def make(original):
        return lambda self: original(self) + "!"

    assert patching.wrap(Target, "greet", make)
    assert not patching.wrap(Target, "greet", make)  # idempotent
    assert Target().greet() == "hi!"
    assert patching.original(Target, "greet")(Target()) == "hi"
    patching.undo_all()
    assert Target().greet() == "hi" and "greet" in vars(Target)


def test_settings_from_environment_and_configure():
    settings = config.from_environment(
        {"TD_BATCH_SIZE": "GLOBAL", "TD_VERBOSE": "1", "TD_WARMUP_EPOCHS": "2.5"}
    )
    assert settings.batch_size == "global" and settings.verbose is True
    assert settings.warmup_epochs == 2.5
    with pytest.raises(ValueError, match="TD_BATCH_SIZE='huge' is not one of: per_rank, global"):
        config.from_environment({"TD_BATCH_SIZE": "huge"})
    with pytest.raises(TypeError, match="unknown setting"):
        config.configure(batch=1)
    before = config.SETTINGS.lr_scaling
    try:
        assert config.configure(lr_scaling="linear").lr_scaling == "linear"
    finally:
        config.configure(lr_scaling=before)


def test_import_hook_runs_after_import_and_at_once_if_loaded(monkeypatch):
    seen = []
    name = "td_hook_probe_module"
    module = types.ModuleType(name)
    import_hook.when_imported("json", lambda m: seen.append(m.__name__))
    assert seen == ["json"]  # already imported: called at once
    monkeypatch.setitem(sys.modules, name, module)
    import_hook.when_imported(name, lambda m: seen.append("probe"))
    assert seen == ["json", "probe"]
    import_hook.when_imported("email.mime.audio", lambda m: seen.append(m.__name__))
    sys.modules.pop("email.mime.audio", None)
    import email.mime.audio  # noqa: F401

    assert seen[-1] == "email.mime.audio"
    import_hook.remove()


@pytest.mark.mpi
def test_collectives_on_three_ranks(tmp_path):
    run(
        ["-m", "transparent_dist", str(JOBS / "collectives_check.py"), str(tmp_path)], ranks=3
    ).check()
    results = load_ranks(tmp_path, "coll", 3)
    # Weights 1 and 2 (rank 2 has weight 0 and NaNs): (1*1 + 2*2) / 3.
    expected_a = (1 * 1 + 2 * 2) / 3
    for result in results:
        assert result == results[0]  # every rank holds the same answer
    first = results[0]
    np.testing.assert_allclose(first["avg"][0], [expected_a] * 5, rtol=1e-6)
    np.testing.assert_allclose(first["avg"][1], np.arange(6).reshape(2, 3) * expected_a)
    np.testing.assert_allclose(first["avg"][2], [expected_a] * 3, rtol=1e-3)
    assert first["avg_dtypes"] == ["float32", "float64", "float16"]
    assert first["sum"] == [[3.0, 3.0]]
    assert first["bcast"] == [1, [[0.0, 0.0], [0.0, 0.0]]]
    assert first["gather"] == [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0]]
    assert "disagree on a test value" in first["agree"] and "rank 1: 8" in first["agree"]


def test_a_dataset_the_script_sharded_is_not_called_whole():
    import tensorflow as tf

    from transparent_dist.adapters import custom_loops

    whole = tf.data.Dataset.range(12).batch(3)
    assert not custom_loops._is_sharded(whole)
    assert custom_loops._is_sharded(whole.shard(2, 0))
    assert custom_loops._is_sharded(tf.data.Dataset.range(12).shard(2, 1).batch(3).prefetch(1))


def test_mpich_yields_only_when_the_node_is_oversubscribed():
    from transparent_dist.core import world

    cores = os.cpu_count()
    env = {"MPI_LOCALNRANKS": str(cores + 1)}
    assert world.yield_when_oversubscribed(env) and env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"
    env = {"SLURM_STEP_TASKS_PER_NODE": f"{cores + 2}(x2)"}
    assert world.yield_when_oversubscribed(env)
    for env in (
        {"MPI_LOCALNRANKS": str(cores)},  # one core each: spinning is fastest
        {"MPI_LOCALNRANKS": str(cores + 1), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "0"},  # the user's
        {},
    ):
        before = dict(env)
        assert not world.yield_when_oversubscribed(env) and env == before
