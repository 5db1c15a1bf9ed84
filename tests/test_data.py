"""HDF5, CSV and NetCDF inputs sharded by rank (real files, real ranks)."""

from __future__ import annotations

import csv
import os

import h5py
import netCDF4
import numpy as np
import pytest
from conftest import JOBS, load_ranks, run, run_together

from transparent_dist.core.sharding import shard_range

pytestmark = pytest.mark.mpi  # every test here reads what mpiexec jobs wrote

ROWS, COLS = 20000, 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, COLS)).astype("float32")
    x[:, 0] = np.arange(ROWS)  # column 0 is the row id
    y = (x[:, 1:9].sum(axis=1) * 0.1).astype("float32")
    with h5py.File(directory / "data.h5", "w") as f:
        f["x"] = x
        f["y"] = y
        f.create_dataset("compressed", data=x, chunks=(500, COLS), compression="gzip")
        f["short"] = y[:-10]
        f["one"] = x[:1]
        f["empty"] = np.zeros((0, 4), "float32")
    with netCDF4.Dataset(directory / "data.nc", "w") as nc:
        nc.createDimension("time", None)
        nc.createDimension("feature", COLS)
        # Chunked by 500 records, as a file written for reading by rows is
        # (the library default for an unlimited dimension is one record).
        t = nc.createVariable("t", "f4", ("time", "feature"), chunksizes=(500, COLS))
        t[:] = x
    with open(directory / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "mixed", "a", "b", "label"])
        for i in range(ROWS):
            # 'mixed' is integral in the first half, fractional in the second.
            mixed = i if i < ROWS // 2 else i + 0.5
            writer.writerow([i, mixed, f"{x[i, 1]:.6f}", f"{x[i, 2]:.6f}", f"{y[i]:.6f}"])
    text = (directory / "data.csv").read_text().splitlines()
    ragged = list(text[:300])
    ragged[57] = "57,57,0.1,0.2"  # a field short (file line 58)
    (directory / "ragged.csv").write_text("\n".join(ragged) + "\n")
    nonnumeric = list(text[:3000])
    nonnumeric[2345] = "2344,2344,0.1,abc,0.3"  # file line 2346, column 'b'
    (directory / "nonnumeric.csv").write_text("\n".join(nonnumeric) + "\n")
    # Missing values in the last rank's rows, whatever the job size: the
    # last line, row, record.
    gap = list(text[:3000])
    gap[-1] = "2998,NA,0.1,0.2,0.3"  # file line 3000, column 'mixed'
    (directory / "missing.csv").write_text("\n".join(gap) + "\n")
    with h5py.File(directory / "missing.h5", "w") as f:
        f["x"] = x[:3000, :4]
        f["x"][2999, 3] = np.nan
    with netCDF4.Dataset(directory / "missing.nc", "w") as nc:
        nc.createDimension("time", None)
        t = nc.createVariable("t", "f4", ("time",), fill_value=-999.0)
        t[:] = np.append(y[:2999], -999.0)
        flags = nc.createVariable("flags", "i2", ("time",), fill_value=-1)
        flags[:] = np.append(np.ones(2999, "int16"), -1)
    (directory / "empty.csv").write_text("")
    (directory / "tiny.csv").write_text("id,label\n1,2\n")
    return directory


@pytest.fixture(scope="module")
def results(files):
    specs = {
        ranks: dict(
            args=["-m", "transparent_dist", str(JOBS / "data_check.py"), str(files)], ranks=ranks
        )
        for ranks in (1, 2, 3)
    }
    # 1 rank beside 2 (nothing here is timed), then 3.
    for group in ((1, 2), (3,)):
        for job in run_together(*(specs[r] for r in group)):
            job.check()
    return {ranks: load_ranks(files, f"data-{ranks}", ranks) for ranks in (1, 2, 3)}


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("key", ["hdf5", "hdf5_compressed", "netcdf", "csv"])
def test_shards_are_exact_ordered_and_balanced(results, ranks, key):
    pieces = []
    for rank, result in enumerate(results[ranks][rank] for rank in range(ranks)):
        ids = (
            result[key]["ids"]
            if key == "csv"
            else result[key]["rows"]
            if key == "hdf5"
            else result[f"{key}_rows"]
        )
        pieces.append(ids)
        if key != "csv":  # byte-range CSV blocks are balanced in bytes, not rows
            start, stop = shard_range(ROWS, rank, ranks)
            assert ids == list(range(start, stop))
    assert [i for piece in pieces for i in piece] == list(range(ROWS))


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize(
    "key,name",
    [
        ("hdf5_bytes", "data.h5"),
        ("netcdf_bytes", "data.nc"),
        ("csv_bytes", "data.csv"),
        ("hdf5_compressed_bytes", "data.h5"),
    ],
)
def test_each_rank_reads_about_one_nth_of_the_bytes(results, files, ranks, key, name):
    share = (
        ROWS * COLS * 4 / ranks
        if "hdf5" in key or "netcdf" in key
        else os.path.getsize(files / name) / ranks
    )
    for result in results[ranks]:
        read = result[key]
        if key == "netcdf_bytes":
            read -= result["netcdf_open_bytes"]  # a constant per open, see data_check.py
        if key == "hdf5_compressed_bytes":
            assert read < 1.3 * os.path.getsize(files / name) / ranks
        else:
            assert 0.9 * share < read < 1.25 * share, (key, read, share)


def test_csv_types_agree_across_ranks(results):
    for result in results[2]:
        # Rank 0's half of 'mixed' is all integers; it must still be float64.
        assert result["csv_mixed_dtype"] == "float64"
        assert result["csv_int_dtype"] == "int64"
        assert result["csv"]["dtype"] == "float32"


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_dataset_object(results, ranks):
    total = sum(r["dataset"]["train"] + r["dataset"]["val"] for r in results[ranks])
    assert total == ROWS
    steps = {r["dataset"]["steps"] for r in results[ranks]}
    assert len(steps) == 1 and {r["dataset"]["batches"] for r in results[ranks]} == steps
    assert {r["dataset"]["num_training"] for r in results[ranks]} == {
        sum(r["dataset"]["train"] for r in results[ranks])
    }


EXPECTED_ERRORS = {
    "missing_file": "no such file",
    "missing_dataset": "has no dataset 'nope'; its datasets:",
    "missing_variable": "has no variable 'nope'; its variables: t",
    "missing_column": "has no column 'nope'; its columns: id, mixed, a, b, label",
    "missing_csv": "no such file",
    "length_mismatch": "data and labels differ in length",
    "ragged_csv": "ragged.csv, line 58: expected 5 fields, found 4",
    "non_numeric_csv": "nonnumeric.csv, line 2346, column 'b': 'abc' is not a number",
    "too_few_rows": "has 1 rows, fewer than the 2 ranks",
    "empty_dataset": "empty",
    "empty_csv": "empty",
    "too_few_csv_rows": "too few for the 2 ranks",
}


MISSING = "; pass allow_nan=True (or set TD_ALLOW_NAN=1) to read missing values as NaN"
MISSING_ERRORS = {
    "missing_csv_cell": "missing.csv, line 3000, column 'mixed': missing value ('NA')" + MISSING,
    "missing_hdf5_value": "missing.h5: dataset 'x', row 2999 (element [2999, 3]): "
    "missing value (NaN)" + MISSING,
    "missing_netcdf_value": "missing.nc: variable 't', row 2999: missing value "
    "(masked, stored as -999.0)" + MISSING,
}


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(MISSING_ERRORS))
def test_missing_value_on_the_last_rank_is_every_ranks_error(results, files, ranks, case):
    messages = [r["errors"][case] for r in results[ranks]]
    suffix = "" if ranks == 1 else f" (on rank {ranks - 1})"
    assert messages[0] == f"transparent_dist: {files}/{MISSING_ERRORS[case]}{suffix}"
    assert messages == [messages[0]] * ranks


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_missing_values_allowed_are_nan_with_one_dtype(results, ranks):
    for key in ("csv_id", "netcdf_flags"):
        # The integer column/variable has a gap on the last rank only:
        # every rank still gets float64, and the gap is one NaN.
        assert {r["allowed"][key]["dtype"] for r in results[ranks]} == {"float64"}
        assert sum(r["allowed"][key]["nan"] for r in results[ranks]) == 1
        assert sum(r["allowed"][key]["rows"] for r in results[ranks]) == 2999 + (key != "csv_id")


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_input_raises_the_same_clear_error_on_all_ranks(results, case):
    messages = [r["errors"][case] for r in results[2]]
    assert messages[0] is not None and EXPECTED_ERRORS[case] in messages[0], messages[0]
    assert messages[1] == messages[0]


def test_uncaught_bad_input_ends_the_job_promptly_and_once(files, tmp_path):
    code = (
        "import transparent_dist.data as d; "
        f"d.read_csv({str(files / 'nonnumeric.csv')!r}, label='label')"
    )
    job = run(["-m", "transparent_dist", "-c", code], ranks=2, timeout=120)
    assert job.returncode != 0 and job.seconds < 30
    assert job.stderr.count("'abc' is not a number") == 1  # said once, by rank 0


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_lazy_h5py_fit_equals_in_memory(results, ranks):
    for result in results[ranks]:
        np.testing.assert_allclose(
            result["lazy"]["weights"], result["memory"]["weights"], atol=1e-5
        )
        for key, values in result["memory"]["history"].items():
            np.testing.assert_allclose(result["lazy"]["history"][key], values, rtol=1e-5)
        np.testing.assert_allclose(result["lazy_predict"], result["memory_predict"], atol=1e-5)
        np.testing.assert_allclose(result["lazy_evaluate"], result["memory_evaluate"], rtol=1e-5)
    first = np.asarray(results[ranks][0]["shuffled"])
    for result in results[ranks][1:]:
        np.testing.assert_array_equal(result["shuffled"], first)
    # Across job sizes too: N ranks x 128 equals one process x N*128 ...
    # (checked for arrays in test_keras_core); here one process works at all.
    assert results[1][0]["lazy"]["weights"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_missing_value_on_the_last_rank_ends_the_job_promptly(files, ranks):
    code = (
        "import transparent_dist.data as d; "
        f"d.read_csv({str(files / 'missing.csv')!r}, label='label')"
    )
    job = run(["-m", "transparent_dist", "-c", code], ranks=ranks, timeout=120)
    assert job.returncode != 0 and job.seconds < 30, (job.returncode, job.seconds)
    said = f"missing.csv, line 3000, column 'mixed': missing value ('NA'){MISSING}"
    assert job.stderr.count(said) == 1, job.stderr[-3000:]  # said once, by rank 0


def test_lazy_fit_memory_stays_bounded(tmp_path):
    """A 420 MB dataset on 2 ranks: each rank's peak memory grows by a small
    fraction of its 210 MB share, so it never holds the whole (or its part)."""
    path = tmp_path / "big.h5"
    rows = 1_600_000
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", shape=(rows, 64), dtype="float32", chunks=(16384, 64))
        step = 200_000
        for start in range(0, rows, step):
            x[start : start + step] = np.random.default_rng(start).normal(size=(step, 64))
        f["y"] = np.zeros(rows, "float32")
    run(
        ["-m", "transparent_dist", str(JOBS / "lazy_memory.py"), str(path), str(tmp_path)], ranks=2
    ).check()
    for result in load_ranks(tmp_path, "memory", 2):
        assert result["file_bytes"] > 400e6
        assert result["growth"] < 0.15 * result["file_bytes"], result
        assert np.isfinite(result["loss"])
