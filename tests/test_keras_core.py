"""The core path: unmodified Keras 3 `fit` / `evaluate` / `predict` under
mpiexec, compared number by number with one plain-Keras process taking the
global batch, and with the same job run without the plugin (the control)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from conftest import JOBS, background, background_result, job_env, load_ranks, run, run_together

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "keras_core.py")
EQUIVALENT = [
    "arrays",
    "arrays_shuffled",
    "unseeded",
    "files",
    "early_stopping",
    "dataset",
    "pydataset",
    "generator",
    "dict_inputs",
    "global_batch",
    "xla",
]


# The Open MPI leg (test_open_mpi.py) runs this file again at 2 ranks only,
# without the plugin-off control: the MPI library plays no part in those.
OPEN_MPI_LEG = os.environ.get("TD_TEST_LEG") == "open_mpi"
RANKS = (2,) if OPEN_MPI_LEG else (2, 3)
# At 3 ranks (500 rows, 101 rows to evaluate, 1 and 5 rows to predict: every
# split uneven) the scenarios an uneven split could bend; the others (the
# broadcast of unseeded weights, callbacks, XLA, float16, the LR factor, a
# custom loop) run at 2 ranks only: the suite's time budget decides it.
AT_THREE_RANKS = [
    "arrays",
    "arrays_shuffled",
    "sample_usage",
    "dataset",
    "pydataset",
    "generator",
    "global_batch",
    "few_rows",
    "tracker_tail",
]
# Under Open MPI, what the MPI library carries: the exchange and the gathers
# of evaluate/predict (arrays, shuffled or not), the broadcast (unseeded), the data
# communicator (dataset), the per-round agreement (generator), a custom
# loop, float16 and the sample ledger.
OPEN_MPI_SCENARIOS = [
    "arrays",
    "arrays_shuffled",
    "unseeded",
    "sample_usage",
    "dataset",
    "generator",
    "custom_loop",
    "mixed_precision",
]


def _run_at(ranks: int) -> list[str] | None:
    """The scenarios the job at `ranks` runs (None: all)."""
    if OPEN_MPI_LEG:
        return OPEN_MPI_SCENARIOS
    return None if ranks == 2 else AT_THREE_RANKS


def _ranks(*scenarios: str) -> list[int]:
    """The rank counts whose jobs run every one of `scenarios`."""
    return [r for r in RANKS if _run_at(r) is None or set(scenarios) <= set(_run_at(r))]


def _pairs(scenarios: list[str]) -> list[tuple[int, str]]:
    return [(r, s) for r in RANKS for s in scenarios if r in _ranks(s)]


def _chosen(ranks: int) -> dict[str, str]:
    return {"SCENARIOS": ",".join(_run_at(ranks))} if _run_at(ranks) else {}


# The one-process references (nothing times them) start with the session,
# on the core the in-process tests leave idle (conftest.background).
REFERENCES = {
    ranks: background(
        f"keras_core-reference{ranks}",
        __file__,
        lambda out, ranks=ranks: [SCRIPT, str(out), "reference", str(ranks)],
        **_chosen(ranks),
    )
    for ranks in RANKS
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out, specs = {}, {}
    for ranks in RANKS:
        out[ranks] = {"dir": tmp_path_factory.mktemp(f"plugin{ranks}")}
        specs[f"plugin{ranks}"] = dict(
            args=["-m", "transparent_dist", SCRIPT, str(out[ranks]["dir"]), "plugin"],
            ranks=ranks,
            env=job_env(**_chosen(ranks)),
        )
    groups = [["plugin2"]]
    if not OPEN_MPI_LEG:
        control_dir = tmp_path_factory.mktemp("control")
        # Only the scenarios the control is checked on.
        checked = job_env(SCENARIOS="arrays,unseeded,custom_loop,sample_usage")
        specs["control"] = dict(args=[SCRIPT, str(control_dir), "control"], ranks=2, env=checked)
        groups = [["plugin2"], ["plugin3", "control"]]
    done = {}
    for group in groups:
        for name, job in zip(group, run_together(*(specs[n] for n in group)), strict=True):
            done[name] = job.check()
    for ranks in RANKS:
        background_result(f"keras_core-reference{ranks}").check()
        out[ranks]["job"] = done[f"plugin{ranks}"]
        out[ranks]["ranks"] = load_ranks(out[ranks]["dir"], f"plugin-{ranks}", ranks)
        out[ranks]["reference"] = load_ranks(REFERENCES[ranks], f"reference-{ranks}", 1)[0]
    if not OPEN_MPI_LEG:
        out["control"] = load_ranks(control_dir, "control-2", 2)
    return out


def _weights(result):
    return np.asarray(result["weights"])


@pytest.mark.parametrize("ranks,scenario", _pairs(EQUIVALENT))
def test_n_ranks_times_b_equals_one_process_times_nb(jobs, ranks, scenario):
    reference = _weights(jobs[ranks]["reference"][scenario])
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        np.testing.assert_allclose(
            _weights(result[scenario]),
            reference,
            atol=1e-5,
            rtol=0,
            err_msg=f"{scenario}: rank {rank} of {ranks}",
        )


@pytest.mark.parametrize("ranks", _ranks("mixed_precision"))
def test_mixed_precision_trains_like_one_process(jobs, ranks):
    # Not number for number: with dynamic loss scaling, which early steps
    # overflow in float16 (and are skipped) depends on the rows each process
    # computes on; the numpy exchange differs from one process as much.
    reference = jobs[ranks]["reference"]["mixed_precision"]
    for result in jobs[ranks]["ranks"]:
        assert result["mixed_precision"]["optimizer"] == "LossScaleOptimizer"
        final = result["mixed_precision"]["history"]["loss"][-1]
        assert (
            abs(final - reference["history"]["loss"][-1]) < 0.1 * reference["history"]["loss"][-1]
        )


@pytest.mark.parametrize("ranks,scenario", _pairs(EQUIVALENT + ["custom_loop", "mixed_precision"]))
def test_all_ranks_end_bit_identical(jobs, ranks, scenario):
    first = _weights(jobs[ranks]["ranks"][0][scenario])
    for result in jobs[ranks]["ranks"][1:]:
        np.testing.assert_array_equal(_weights(result[scenario]), first)


@pytest.mark.skipif(OPEN_MPI_LEG, reason="no MPI library plays a part in the control")
def test_control_without_plugin_differs(jobs):
    """The same job without the plugin: every rank trains alone on all the
    data, so it neither matches the reference nor keeps the ranks equal."""
    control, reference = jobs["control"], jobs[2]["reference"]
    assert np.abs(_weights(control[0]["arrays"]) - _weights(reference["arrays"])).max() > 1e-3
    for scenario in ("unseeded", "custom_loop"):
        assert np.abs(_weights(control[0][scenario]) - _weights(control[1][scenario])).max() > 1e-3


@pytest.mark.parametrize("ranks", _ranks("unseeded"))
def test_unseeded_start_is_made_equal(jobs, ranks):
    initial = [np.asarray(r["unseeded"]["initial"]) for r in jobs[ranks]["ranks"]]
    assert np.abs(initial[0] - initial[1]).max() > 1e-3  # they did start apart


@pytest.mark.parametrize(
    "ranks,scenario",
    _pairs(["arrays", "arrays_shuffled", "dataset", "pydataset", "generator", "dict_inputs"]),
)
def test_logs_are_the_global_values(jobs, ranks, scenario):
    reference = jobs[ranks]["reference"][scenario]["history"]
    for result in jobs[ranks]["ranks"]:
        history = result[scenario]["history"]
        assert history.keys() == reference.keys()
        for key in reference:
            np.testing.assert_allclose(history[key], reference[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("ranks", _ranks("arrays", "arrays_shuffled", "dataset"))
def test_evaluate_and_predict_are_global_on_every_rank(jobs, ranks):
    reference = jobs[ranks]["reference"]
    for result in jobs[ranks]["ranks"]:
        for scenario in ("arrays", "arrays_shuffled"):
            np.testing.assert_allclose(
                result[scenario]["evaluate"], reference[scenario]["evaluate"], rtol=1e-5
            )
            predicted = np.asarray(result[scenario]["predict"])
            assert predicted.shape == (101,)  # all rows, on every rank
            np.testing.assert_allclose(predicted, reference[scenario]["predict"], atol=1e-5)
        np.testing.assert_allclose(
            result["dataset"]["evaluate"], reference["dataset"]["evaluate"], rtol=1e-5
        )


@pytest.mark.parametrize("ranks", _ranks("sample_usage"))
def test_every_sample_used_exactly_once_per_epoch(jobs, ranks):
    results = jobs[ranks]["ranks"]
    for epoch in range(2):
        seen = [set(r["sample_usage"]["epochs"][epoch]["ids"]) for r in results]
        assert sum(len(s) for s in seen) == 500
        assert set().union(*seen) == set(range(500))
        for r in results:
            entry = r["sample_usage"]["epochs"][epoch]
            assert entry["max"] == 1.0  # no sample twice on a rank
            assert entry["global_min"] == entry["global_max"] == 1.0
            assert abs(len(entry["ids"]) - 500 / ranks) < 1  # balanced
    if "control" in jobs:
        control = jobs["control"][0]["sample_usage"]["epochs"][0]
        assert len(control["ids"]) == 500  # without the plugin each rank takes all


@pytest.mark.parametrize("ranks", _ranks("files"))
def test_side_effects_happen_on_rank_zero_only(jobs, ranks):
    directory = jobs[ranks]["dir"]
    rows = list(csv.reader((directory / "log.csv").open()))
    assert rows[0] == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [row[0] for row in rows[1:]] == ["0", "1"]  # one header, one row per epoch
    writers = (directory / "checkpoint-writers.txt").read_text().split()
    assert writers and set(writers) == {"0"}
    assert (directory / "final.keras").stat().st_size > 0
    assert (directory / "final.weights.h5").stat().st_size > 0
    # Rank 0's CSV values are the global ones.
    history = jobs[ranks]["reference"]["files"]
    assert history  # the reference ran the same scenario


@pytest.mark.parametrize("ranks", _ranks("early_stopping"))
def test_early_stopping_decides_alike(jobs, ranks):
    expected = jobs[ranks]["reference"]["early_stopping"]["epochs_run"]
    assert expected < 10
    assert [r["early_stopping"]["epochs_run"] for r in jobs[ranks]["ranks"]] == [expected] * ranks


@pytest.mark.parametrize("ranks", _ranks("lr_scaling"))
def test_linear_lr_scaling_with_warmup(jobs, ranks):
    for result in jobs[ranks]["ranks"]:
        assert result["lr_scaling"]["lr"] == pytest.approx(0.05 * ranks)


def _xla_modules(directory, name):
    """The modules XLA says it compiled in a process (its dump,
    XLA_FLAGS in the job): {file name: number of dot operations}."""
    dump = directory / name
    modules = sorted(dump.glob("*before_optimizations.txt")) if dump.exists() else []
    return {m.name: m.read_text().count(" dot(") for m in modules}


@pytest.mark.parametrize("ranks", _ranks("xla", "mixed_precision"))
def test_xla_compiles_keras_train_step_and_equals_one_process(jobs, ranks):
    """jit_compile=True stays on: XLA itself compiled the forward and
    backward pass (the two Dense layers' 2 forward, 2 weight-gradient and
    1 input-gradient matmuls in one module) on every rank, and the
    mixed-precision model trains like one process (as
    test_mixed_precision_trains_like_one_process) and like the same job's
    `mixed_precision` model without XLA. The weights equal one process's:
    test_n_ranks_times_b_equals_one_process_times_nb[xla]."""
    reference = jobs[ranks]["reference"]["xla"]
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        assert result["xla"]["jit_compile"] is True
        compiled = _xla_modules(jobs[ranks]["dir"], f"xla-plugin-{ranks}-rank{rank}")
        assert max(compiled.values(), default=0) >= 5, compiled
        np.testing.assert_allclose(
            result["xla"]["history"]["loss"], reference["history"]["loss"], rtol=1e-5
        )
        np.testing.assert_allclose(result["xla"]["evaluate"], reference["evaluate"], rtol=1e-5)
        final = result["xla"]["mixed"]["history"]["loss"][-1]
        want = reference["mixed"]["history"]["loss"][-1]
        assert abs(final - want) < 0.1 * want
        np.testing.assert_allclose(
            result["xla"]["mixed"]["weights"], result["mixed_precision"]["weights"], atol=1e-3
        )
    first = jobs[ranks]["ranks"][0]["xla"]["mixed"]["weights"]
    for result in jobs[ranks]["ranks"][1:]:
        np.testing.assert_array_equal(result["xla"]["mixed"]["weights"], first)


@pytest.mark.parametrize("ranks", _ranks("xla"))
def test_xla_is_turned_off_for_a_scripts_own_train_step_and_said_once(jobs, ranks):
    """A train_step of the script's own holds the update, and with it the
    exchange, which XLA cannot compile: XLA off for it, said once, and the
    result still one process's."""
    reference = jobs[ranks]["reference"]["xla"]["own_step"]
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        assert result["xla"]["own_step"]["jit_compile"] is False
        np.testing.assert_allclose(
            result["xla"]["own_step"]["weights"],
            reference["weights"],
            atol=1e-5,
            rtol=0,
            err_msg=f"rank {rank} of {ranks}",
        )
    assert jobs[ranks]["job"].stderr.count("jit_compile (XLA) is turned off") == 1


@pytest.mark.parametrize("ranks", _ranks("few_rows"))
def test_predict_and_evaluate_of_fewer_rows_than_ranks_equal_one_process(jobs, ranks):
    """1 row (fewer than the ranks) and 5 (not divisible by 2 or 3), as
    arrays, a dict of arrays, arrays into Conv1D and LSTM layers, datasets
    of known and unknown length, a PyDataset and (evaluate) a generator:
    every rank returns exactly what one process returns, rows in order."""
    reference = jobs[ranks]["reference"]["few_rows"]
    assert len(reference) == 26 and len(reference["predict_dict_1"]) == 1
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        got = result["few_rows"]
        assert got.keys() == reference.keys()
        for key, want in reference.items():
            assert np.shape(got[key]) == np.shape(want), f"{key}, rank {rank} of {ranks}"
            np.testing.assert_allclose(
                got[key], want, rtol=1e-5, atol=1e-6, err_msg=f"{key}, rank {rank} of {ranks}"
            )


@pytest.mark.parametrize("ranks", _ranks("tracker_tail"))
@pytest.mark.parametrize("kind", ["unknown", "known"])
def test_a_tracker_counts_the_last_partial_round_as_one_process(jobs, ranks, kind):
    """A custom train_step's `Mean` of each batch's loss (issue #25): the
    epoch's last round, split unevenly over the ranks, counts as one
    process's last batch, whether the dataset's length is known or it runs
    out (unknown length)."""
    reference = jobs[ranks]["reference"]["tracker_tail"][kind]
    for rank, result in enumerate(jobs[ranks]["ranks"]):
        got = result["tracker_tail"][kind]
        what = f"{kind}, rank {rank} of {ranks}"
        np.testing.assert_allclose(got["weights"], reference["weights"], atol=1e-5, err_msg=what)
        np.testing.assert_allclose(
            got["history"]["loss"], reference["history"]["loss"], rtol=1e-5, err_msg=what
        )


def test_only_rank_zero_prints(tmp_path):
    # One write per line (an f-string): print's separate pieces from three
    # processes may interleave on the shared stderr pipe.
    code = (
        "import transparent_dist as td, sys; print(f'hello from {td.rank()}'); "
        "print(f'err {td.rank()}', file=sys.stderr)"
    )
    job = run(["-m", "transparent_dist", "-c", code], ranks=3).check()
    assert job.stdout.split("\n").count("hello from 0") == 1
    assert "hello from 1" not in job.stdout and "hello from 2" not in job.stdout
    assert all(f"err {r}" in job.stderr for r in range(3))  # errors are never hidden
    json.dumps(job.stdout)
