"""Missing values in CSV, HDF5 and NetCDF inputs: an error naming the file
and the place, or NaN when allowed (in-process: a world of size 1). The
multi-rank side (the last rank's rows end the whole job) is in
tests/test_data.py."""

from __future__ import annotations

import tracemalloc

import h5py
import netCDF4
import numpy as np
import pytest

from transparent_dist.core import config
from transparent_dist.data import DataError, DataSet, missing, read_csv, read_hdf5, read_netcdf

HINT = "pass allow_nan=True (or set TD_ALLOW_NAN=1)"
CELLS = {
    "": "empty cell",
    "NA": "'NA'",
    "NaN": "'NaN'",
    "nan": "'nan'",
    "null": "'null'",
    " ": "whitespace-only cell",
    " \t ": "whitespace-only cell",
    "NAN": "'NAN'",  # not in pyarrow's null words: parsed as a float NaN
}


@pytest.fixture
def setting_off(monkeypatch):
    monkeypatch.setattr(config.SETTINGS, "allow_nan", False)


def write_csv(path, cell, newline="\n"):
    # Line 1 header, line 3 blank (pyarrow skips it), the cell on line 5.
    lines = ["a,b,label", "1,2,0", "", "3,4,1", f"5,{cell},2", "6,7,3"]
    path.write_text(newline.join(lines) + newline)
    return path


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_csv_missing_cell_names_file_line_and_column(tmp_path, setting_off, cell):
    path = write_csv(tmp_path / "m.csv", cell)
    with pytest.raises(DataError) as error:
        read_csv(str(path), label="label")
    assert str(error.value) == (
        f"transparent_dist: {path}, line 5, column 'b': missing value ({CELLS[cell]}); "
        f"{HINT} to read missing values as NaN"
    )


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_csv_missing_cell_allowed_is_nan(tmp_path, setting_off, cell):
    path = write_csv(tmp_path / "m.csv", cell)
    x, y = read_csv(str(path), label="label", allow_nan=True)
    expected = np.array([[1, 2], [3, 4], [5, np.nan], [6, 7]], "float32")
    np.testing.assert_array_equal(x, expected)
    assert x.dtype == np.float32 and y.tolist() == [0, 1, 2, 3]
    # dtype=None: the integer column with a gap becomes float64, not a
    # garbage integer.
    whole = read_csv(str(path), dtype=None, allow_nan=True)
    assert whole.dtype == np.float64 and np.isnan(whole[2, 1]) and whole[3, 1] == 7


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csv_line_numbers_count_blank_lines_and_no_header(tmp_path, setting_off, newline):
    path = write_csv(tmp_path / "m.csv", "NA", newline)
    with pytest.raises(DataError, match=r"line 5, column 'b'"):
        read_csv(str(path))
    headless = tmp_path / "headless.csv"
    headless.write_bytes(path.read_bytes().split(newline.encode(), 1)[1])
    with pytest.raises(DataError, match=r"line 4, column '1'"):
        read_csv(str(headless), header=False, columns=[1])
    with pytest.raises(DataError, match=r"line 5, column 'b'"):
        read_csv(str(path), dtype=None)


def test_csv_the_setting_allows_and_the_keyword_wins(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "m.csv", "NA")
    assert config.from_environment({"TD_ALLOW_NAN": "1"}).allow_nan is True
    assert config.from_environment({}).allow_nan is False
    monkeypatch.setattr(config.SETTINGS, "allow_nan", True)
    assert np.isnan(read_csv(str(path), label="label")[0][2, 1])
    with pytest.raises(DataError, match="missing value"):
        read_csv(str(path), label="label", allow_nan=False)


def test_csv_missing_label_and_integer_dtype(tmp_path, setting_off):
    path = tmp_path / "labels.csv"
    path.write_text("a,label\n1,0\n2,\n3,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'label': missing value \(empty cell\)"):
        read_csv(str(path), label="label", dtype=None)
    _, y = read_csv(str(path), label="label", dtype=None, allow_nan=True)
    assert y.dtype == np.float64 and np.isnan(y[1])
    # An integer dtype cannot hold NaN: allowed or not, it is an error.
    with pytest.raises(DataError, match=r"line 3, column 'label'.*NaN does not fit dtype='int32'"):
        read_csv(str(path), label="label", dtype="int32", allow_nan=True)


def test_csv_non_numbers_stay_errors_and_the_first_problem_is_named(tmp_path, setting_off):
    path = tmp_path / "both.csv"
    path.write_text("a,b\n1,2\n3, \n4,abc\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': missing value"):
        read_csv(str(path))
    with pytest.raises(DataError, match=r"line 4, column 'b': 'abc' is not a number"):
        read_csv(str(path), allow_nan=True)
    all_missing = tmp_path / "gap.csv"
    all_missing.write_text("a,b\n1,\n2,\n")
    with pytest.raises(DataError, match=r"line 2, column 'b': missing value"):
        read_csv(str(all_missing), dtype=None)
    assert np.isnan(read_csv(str(all_missing), dtype=None, allow_nan=True)[:, 1]).all()


@pytest.fixture
def h5(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        x = np.ones((50, 3), "float32")
        x[37, 2] = np.nan
        f["x"] = x
        f["y"] = np.arange(50, dtype="float64")
        counts = f.create_dataset("counts", data=np.array([4, 5, -9, 7], "int32"))
        counts.attrs["_FillValue"] = np.int32(-9)
    return path


def test_hdf5_nan_names_dataset_and_row(h5, setting_off):
    with pytest.raises(DataError) as error:
        read_hdf5(str(h5), "x")
    assert str(error.value) == (
        f"transparent_dist: {h5}: dataset 'x', row 37 (element [37, 2]): missing value (NaN); "
        f"{HINT} to read missing values as NaN"
    )
    x = read_hdf5(str(h5), "x", allow_nan=True)
    assert x.dtype == np.float32 and np.isnan(x).sum() == 1 and np.isnan(x[37, 2])
    y = read_hdf5(str(h5), "y")  # clean: unchanged
    assert y.dtype == np.float64 and y.tolist() == list(range(50))


def test_hdf5_fill_value_attribute_is_missing(h5, setting_off):
    with pytest.raises(
        DataError, match=r"dataset 'counts', row 2: missing value \(-9, its _FillValue\)"
    ):
        read_hdf5(str(h5), "counts")
    counts = read_hdf5(str(h5), "counts", allow_nan=True)
    assert counts.dtype == np.float64 and counts[[0, 1, 3]].tolist() == [4, 5, 7]
    assert np.isnan(counts[2])


@pytest.fixture
def nc(tmp_path):
    path = tmp_path / "m.nc"
    with netCDF4.Dataset(path, "w") as f:
        f.createDimension("time", None)
        f.createDimension("feature", 2)
        t = f.createVariable("t", "f4", ("time", "feature"), fill_value=-999.0)
        t[0:4] = np.array([[1, 2], [3, 4], [5, -999], [7, 8]])
        gap = f.createVariable("gap", "f8", ("time",))
        gap[0:2] = [1.0, 2.0]
        gap[3] = 4.0  # record 2 never written: the default fill value
        raw_nan = f.createVariable("raw_nan", "f8", ("time",))
        raw_nan[0:4] = [1.0, np.nan, 3.0, 4.0]
        flags = f.createVariable("flags", "i2", ("time",), fill_value=-1)
        flags[0:4] = [1, 0, -1, 1]
        f.createVariable("clean", "i4", ("time",))[0:4] = [1, 2, 3, 4]
    return path


def test_netcdf_fill_value_names_variable_and_row(nc, setting_off):
    with pytest.raises(DataError) as error:
        read_netcdf(str(nc), "t")
    assert str(error.value) == (
        f"transparent_dist: {nc}: variable 't', row 2 (element [2, 1]): missing value "
        f"(masked, stored as -999.0); {HINT} to read missing values as NaN"
    )
    with pytest.raises(DataError, match=r"variable 'gap', row 2: missing value \(masked"):
        read_netcdf(str(nc), "gap")
    with pytest.raises(DataError, match=r"variable 'raw_nan', row 1: missing value \(NaN\)"):
        read_netcdf(str(nc), "raw_nan")
    with pytest.raises(DataError, match=r"variable 'flags', row 2: missing value \(masked"):
        read_netcdf(str(nc), "flags")


def test_netcdf_masked_entries_allowed_are_nan_never_fill_numbers(nc, setting_off):
    t = read_netcdf(str(nc), "t", allow_nan=True)
    assert not isinstance(t, np.ma.MaskedArray) and t.dtype == np.float32
    np.testing.assert_array_equal(t, [[1, 2], [3, 4], [5, np.nan], [7, 8]])
    gap = read_netcdf(str(nc), "gap", allow_nan=True)
    np.testing.assert_array_equal(gap, [1, 2, np.nan, 4])
    flags = read_netcdf(str(nc), "flags", allow_nan=True)
    assert flags.dtype == np.float64
    np.testing.assert_array_equal(flags, [1, 0, np.nan, 1])
    clean = read_netcdf(str(nc), "clean", allow_nan=True)  # no gap: stays integral
    assert clean.dtype == np.int32 and clean.tolist() == [1, 2, 3, 4]
    assert not isinstance(clean, np.ma.MaskedArray)


def test_dataset_passes_allow_nan_on(h5, setting_off):
    with pytest.raises(DataError, match="dataset 'x', row 37"):
        DataSet(str(h5), data="x")
    ds = DataSet(str(h5), data="x", allow_nan=True)
    assert np.isnan(ds.training_data[37, 2])


def test_clean_check_is_one_pass_without_a_temporary_array():
    """The check a clean float block pays: no per-element Python, and no
    block-sized temporary (a 40 MB block, well under 1 MB extra)."""
    block = np.ones((1_000_000, 10), "float32")
    tracemalloc.start()
    try:
        assert missing.first(block) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    block[999_999, 9] = np.nan
    assert missing.first(block) == ((999_999, 9), "NaN")
