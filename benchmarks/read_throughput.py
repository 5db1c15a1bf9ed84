"""Read throughput and bytes read per rank for the sharded file readers.

    mpiexec -n 2 python benchmarks/read_throughput.py --mb 200 --json results/read.json

Rank 0 writes an HDF5, a NetCDF and a CSV file of about `--mb` MB each (in
`--dir`), then every rank reads its shard with `transparent_dist.data`,
timing the read and measuring the bytes it read (`/proc/self/io` rchar).
Prints a table on rank 0 and writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time

import h5py
import netCDF4
import numpy as np
import pyarrow.csv  # noqa: F401 - loaded before measuring

import transparent_dist
from transparent_dist.core import world
from transparent_dist.data import read_csv, read_hdf5, read_netcdf

COLS = 32


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def make_files(directory: str, mb: float) -> dict[str, str]:
    rows = int(mb * 1e6 / (COLS * 4))
    paths = {k: os.path.join(directory, f"bench.{k}") for k in ("h5", "nc", "csv")}
    rng = np.random.default_rng(0)
    step = 100_000
    with h5py.File(paths["h5"], "w") as f:
        x = f.create_dataset("x", (rows, COLS), "float32", chunks=(8192, COLS))
        for s in range(0, rows, step):
            x[s : s + step] = rng.normal(size=(min(step, rows - s), COLS))
    with h5py.File(paths["h5"], "r") as src, netCDF4.Dataset(paths["nc"], "w") as nc:
        nc.createDimension("record", None)
        nc.createDimension("feature", COLS)
        v = nc.createVariable("x", "f4", ("record", "feature"), chunksizes=(8192, COLS))
        for s in range(0, rows, step):
            block = src["x"][s : s + step]
            v[s : s + len(block)] = block
    csv_rows = rows // 4  # text is ~4x larger per value
    with h5py.File(paths["h5"], "r") as src, open(paths["csv"], "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([f"c{i}" for i in range(COLS)])
        for s in range(0, csv_rows, step):
            writer.writerows(np.round(src["x"][s : min(s + step, csv_rows)], 5).tolist())
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default="results/read_throughput.json")
    args = parser.parse_args()
    w = world.get()
    directory = args.dir or tempfile.gettempdir()
    paths = make_files(directory, args.mb) if w.rank == 0 else None
    if w.size > 1:
        paths = w.comm.bcast(paths, root=0)
    netCDF4.Dataset(paths["nc"]).close()  # the first open loads libraries
    readers = {
        "hdf5": lambda: read_hdf5(paths["h5"], "x"),
        "netcdf": lambda: read_netcdf(paths["nc"], "x"),
        "csv": lambda: read_csv(paths["csv"]),
    }
    rows = []
    for name, read in readers.items():
        if w.size > 1:
            w.comm.Barrier()
        before, start = rchar(), time.perf_counter()
        data = read()
        seconds, read_bytes = time.perf_counter() - start, rchar() - before
        mine = {
            "format": name,
            "rank": w.rank,
            "seconds": seconds,
            "bytes_read": read_bytes,
            "rows": int(data.shape[0]),
            "file_bytes": os.path.getsize(
                paths[{"hdf5": "h5", "netcdf": "nc", "csv": "csv"}[name]]
            ),
        }
        rows.extend(w.comm.allgather(mine) if w.size > 1 else [mine])
    if w.rank != 0:
        return
    print(
        f"{'format':8} {'rank':>4} {'rows':>10} {'MB read':>9} {'file MB':>8} {'read/file':>9} {'MB/s':>8}"
    )
    for r in rows:
        print(
            f"{r['format']:8} {r['rank']:>4} {r['rows']:>10} {r['bytes_read'] / 1e6:>9.1f} "
            f"{r['file_bytes'] / 1e6:>8.1f} {r['bytes_read'] / r['file_bytes']:>9.3f} "
            f"{r['bytes_read'] / 1e6 / r['seconds']:>8.0f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "ranks": w.size,
                "machine": platform.node(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
                "version": transparent_dist.__version__,
                "results": rows,
            },
            f,
            indent=1,
        )
    for path in paths.values():
        os.remove(path)


if __name__ == "__main__":
    main()
