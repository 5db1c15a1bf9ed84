"""Reads the files made by tests/test_data.py on every rank and writes what
each rank got: shards, bytes read, errors, and lazy-vs-in-memory training.

    mpiexec -n N python -m transparent_dist data_check.py DIR
"""

import json
import os
import sys

import h5py
import netCDF4  # imported before measuring: reading its libraries counts as I/O
import numpy as np
import pyarrow.csv  # noqa: F401

import transparent_dist
from transparent_dist.data import DataError, DataSet, read_csv, read_hdf5, read_netcdf

DIR = sys.argv[1]
RANK, SIZE = transparent_dist.rank(), transparent_dist.size()
out = {}


def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def measured(fn, *args, **kwargs):
    before = rchar()
    result = fn(*args, **kwargs)
    return result, rchar() - before


def path(name):
    return os.path.join(DIR, name)


x, out["hdf5_bytes"] = measured(read_hdf5, path("data.h5"), "x")
out["hdf5"] = {"rows": x[:, 0].tolist(), "shape": list(x.shape)}
c, out["hdf5_compressed_bytes"] = measured(read_hdf5, path("data.h5"), "compressed")
out["hdf5_compressed_rows"] = c[:, 0].tolist()
# netCDF-C reads a fixed block (4 MiB) at every open to sniff the format,
# whatever the file's size: measured apart, so the test can tell it from
# the rows read.
_, out["netcdf_open_bytes"] = measured(lambda: netCDF4.Dataset(path("data.nc")).close())
t, out["netcdf_bytes"] = measured(read_netcdf, path("data.nc"), "t")
out["netcdf_rows"] = t[:, 0].tolist()
(cx, cy), out["csv_bytes"] = measured(read_csv, path("data.csv"), label="label")
out["csv"] = {
    "ids": cx[:, 0].tolist(),
    "shape": list(cx.shape),
    "label": cy.tolist()[:3],
    "dtype": str(cx.dtype),
}
mixed = read_csv(path("data.csv"), columns=["mixed"], dtype=None)
out["csv_mixed_dtype"] = str(mixed.dtype)
ints = read_csv(path("data.csv"), columns=["id"], dtype=None)
out["csv_int_dtype"] = str(ints.dtype)

ds = DataSet(path("data.h5"), data="x", labels="y", validation_split=0.1)
out["dataset"] = {
    "train": len(ds.training_data),
    "val": len(ds.validation_data),
    "steps": ds.steps(64),
    "num_training": ds.num_training,
    "batches": sum(1 for _ in ds.batches(64, shuffle=True, seed=1)),
    "first_train_id": float(ds.training_data[0, 0]),
}

errors = {
    "missing_file": lambda: read_hdf5(path("nope.h5"), "x"),
    "missing_dataset": lambda: read_hdf5(path("data.h5"), "nope"),
    "missing_variable": lambda: read_netcdf(path("data.nc"), "nope"),
    "missing_column": lambda: read_csv(path("data.csv"), label="nope"),
    "missing_csv": lambda: read_csv(path("nope.csv")),
    "length_mismatch": lambda: DataSet(path("data.h5"), data="x", labels="short"),
    "ragged_csv": lambda: read_csv(path("ragged.csv"), label="label"),
    "non_numeric_csv": lambda: read_csv(path("nonnumeric.csv"), label="label"),
    "too_few_rows": lambda: read_hdf5(path("data.h5"), "one"),
    "empty_dataset": lambda: read_hdf5(path("data.h5"), "empty"),
    "empty_csv": lambda: read_csv(path("empty.csv")),
    "too_few_csv_rows": lambda: read_csv(path("tiny.csv")),
    # A missing value on the last rank's rows only.
    "missing_csv_cell": lambda: read_csv(path("missing.csv"), label="label"),
    "missing_hdf5_value": lambda: read_hdf5(path("missing.h5"), "x"),
    "missing_netcdf_value": lambda: read_netcdf(path("missing.nc"), "t"),
}
out["errors"] = {}
for name, call in errors.items():
    try:
        call()
        out["errors"][name] = None
    except DataError as error:
        out["errors"][name] = str(error)


def nan_summary(array):
    return {"dtype": str(array.dtype), "nan": int(np.isnan(array).sum()), "rows": len(array)}


out["allowed"] = {
    "csv_id": nan_summary(
        read_csv(path("missing.csv"), columns=["mixed"], dtype=None, allow_nan=True)
    ),
    "netcdf_flags": nan_summary(read_netcdf(path("missing.nc"), "flags", allow_nan=True)),
}

# Transparent fit on h5py datasets against the same arrays in memory.
import keras  # noqa: E402


def train(xs, ys, shuffle):
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    history = model.fit(xs, ys, batch_size=128, epochs=2, shuffle=shuffle, verbose=0)
    weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    return weights, history.history, model


with h5py.File(path("data.h5"), "r") as f:
    lazy_w, lazy_h, model = train(f["x"], f["y"], False)
    out["lazy_predict"] = model.predict(f["x"], batch_size=500, verbose=0)[:, 0].tolist()[::997]
    out["lazy_evaluate"] = model.evaluate(f["x"], f["y"], batch_size=256, verbose=0)
    shuffled_w, _, _ = train(f["x"], f["y"], True)
with h5py.File(path("data.h5"), "r") as f:
    mem_x, mem_y = f["x"][:], f["y"][:]
memory_w, memory_h, model = train(mem_x, mem_y, False)
out["memory_predict"] = model.predict(mem_x, batch_size=500, verbose=0)[:, 0].tolist()[::997]
out["memory_evaluate"] = model.evaluate(mem_x, mem_y, batch_size=256, verbose=0)
out["lazy"] = {"weights": lazy_w.tolist(), "history": lazy_h}
out["memory"] = {"weights": memory_w.tolist(), "history": memory_h}
out["shuffled"] = shuffled_w.tolist()
with open(os.path.join(DIR, f"data-{SIZE}-rank{RANK}.json"), "w") as f:
    json.dump(out, f)
