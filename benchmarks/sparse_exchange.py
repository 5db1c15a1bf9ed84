"""Sparse (Embedding) gradients: gathering the rows, as transparent_dist
does, against summing the densified table, on the plugin's own buffer
collectives.

    mpiexec -n 2 python benchmarks/sparse_exchange.py --out docs/sparse_exchange

For a vocabulary V x D table and a per-rank batch of B sequences of T
tokens, each rank's gradient has B*T rows. The gather moves N*B*T rows to
every rank; the dense sum moves the V x D table through an allreduce.
Prints a table (rank 0) and writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from transparent_dist.core import collectives

parser = argparse.ArgumentParser()
parser.add_argument("--vocabulary", type=int, default=50_000)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--repeat", type=int, default=10)
parser.add_argument("--out", default="sparse_exchange")
args = parser.parse_args()

comm = MPI.COMM_WORLD
rng = np.random.default_rng(comm.Get_rank())
dense = np.zeros((args.vocabulary, args.dim), np.float32)


def timed(fn) -> float:
    """Median seconds of `fn()` over the repeats, ranks released together."""
    times = []
    for _ in range(args.repeat):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


rows = []
for batch, tokens in [(8, 50), (32, 100), (64, 200), (128, 400)]:
    n = batch * tokens
    indices = rng.integers(0, args.vocabulary, n).astype(np.int64)
    values = rng.normal(size=(n, args.dim)).astype(np.float32)

    def gather(indices=indices, values=values):
        collectives.allgather_rows(indices, comm)
        collectives.allgather_rows(values, comm)

    def densified(indices=indices, values=values):
        dense[:] = 0
        np.add.at(dense, indices, values)
        collectives.allreduce_sum([dense], comm)

    rows.append(
        {
            "batch": batch,
            "tokens": tokens,
            "rows_gathered": n * comm.Get_size(),
            "gather_mb": n * comm.Get_size() * (args.dim * 4 + 8) / 1e6,
            "dense_mb": dense.nbytes / 1e6,
            "gather_ms": 1e3 * timed(gather),
            "dense_ms": 1e3 * timed(densified),
        }
    )

if comm.Get_rank() == 0:
    print(
        f"{comm.Get_size()} ranks, {args.vocabulary} x {args.dim} float32 table, "
        f"median of {args.repeat}"
    )
    print("| batch x tokens | rows gathered | gather MB | dense MB | gather ms | dense ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batch']} x {r['tokens']} | {r['rows_gathered']} | {r['gather_mb']:.1f} | "
            f"{r['dense_mb']:.1f} | {r['gather_ms']:.2f} | {r['dense_ms']:.2f} |"
        )
    with open(f"{args.out}.json", "w") as f:
        json.dump({"ranks": comm.Get_size(), "args": vars(args), "rows": rows}, f, indent=1)
