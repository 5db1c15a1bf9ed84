"""Projects the gradient exchange's step time and weak-scaling efficiency to
16-1,024 nodes from latency (alpha) and inverse bandwidth (beta) measured
here by benchmarks/overlap.py; the numbers of docs/scaling.md.

    python benchmarks/cost_model.py [--links docs/overlap.json] [--out results/cost_model]
    python benchmarks/cost_model.py --links none --link ib100:2:11.5   # name:alpha_us:GB/s
    python benchmarks/cost_model.py --model ResNet-101=44549160:620   # name=parameters:compute_ms

Allreduce of S bytes on P ranks (alpha per message, beta per byte; the
reduction's arithmetic is in beta: the 2-rank fit it comes from includes it):
  ring                   2(P-1) alpha + 2(P-1)/P S beta
  recursive doubling     log2(P) (alpha + S beta)
  Rabenseifner           2 log2(P) alpha + 2(P-1)/P S beta
                         (reduce-scatter by recursive halving, allgather by
                         recursive doubling: MPICH's default above 8 bytes)
The library takes about the cheapest; `best` is the minimum of the three.

A step computes for T_c (forward 1/3, backward 2/3). Without overlap:
T_c + T_ar. With overlap, gradients leave in buckets of `--bucket-mb` as
backprop produces them (evenly over the backward pass), one after another
on the link: the step ends when the later of (the backward pass, then the
last bucket's allreduce) and (the first bucket, then every bucket's
allreduce back to back) does. Efficiency: T_c / step (1 node exchanges
nothing). `T_c for 90 %`: the compute time per step that 90 % efficiency
needs at that size (without overlap: 9 T_ar).

Hierarchical: G ranks per node (`--per-node`), flat across all N.G ranks
against node-local first (reduce on the node over shared memory, allreduce
among the N node leaders, broadcast on the node). A flat Rabenseifner with
ranks numbered node by node sends each rank's halves to far partners first,
so the node's G ranks share its link in every inter-node round.

Prints the tables, writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODES = [16, 32, 64, 128, 256, 512, 1024]
# name: (parameters, assumed compute seconds per step, why)
MODELS = {
    "ResNet-50": (
        25_557_032,
        0.200,
        "batch 64 per GPU (the per-GPU batch of Horovod's 512-GPU benchmark) at ~320 images/s",
    ),
    "CosmoFlow": (
        5_597_604,
        0.100,
        "MLPerf HPC reference model (conv_size 32), batch 4 per GPU: an assumption, no published "
        "step time found",
    ),
}


def ring(p: int, s: float, alpha: float, beta: float) -> float:
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * s * beta


def recursive_doubling(p: int, s: float, alpha: float, beta: float) -> float:
    return math.ceil(math.log2(p)) * (alpha + s * beta)


def rabenseifner(p: int, s: float, alpha: float, beta: float) -> float:
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * (p - 1) / p * s * beta


ALGORITHMS = {"ring": ring, "recursive doubling": recursive_doubling, "Rabenseifner": rabenseifner}


def best(p: int, s: float, alpha: float, beta: float) -> float:
    return min(f(p, s, alpha, beta) for f in ALGORITHMS.values())


def step_time(
    t_c: float, p: int, s: float, alpha: float, beta: float, bucket: float, overlap: bool
) -> float:
    """One step's time on p nodes (see the module's docstring)."""
    if p == 1:
        return t_c
    if not overlap:
        return t_c + best(p, s, alpha, beta)
    buckets = max(1, math.ceil(s / bucket))
    size = s / buckets
    one = best(p, size, alpha, beta)
    forward, backward = t_c / 3, 2 * t_c / 3
    return forward + max(backward + one, backward / buckets + buckets * one)


def hierarchical(
    n: int, g: int, s: float, net: tuple[float, float], shm: tuple[float, float]
) -> dict:
    """Allreduce of s bytes on n nodes x g ranks: flat (ring; Rabenseifner
    sharing the node's link) against node-local reduce + leaders' best +
    node-local broadcast (each node-local step about half a node allreduce)."""
    p = n * g
    a, b = net
    flat_ring = ring(p, s, a, b)
    # Rounds at distance >= g cross nodes; the node's g ranks send together.
    rounds = int(math.log2(n)) if n > 1 else 0
    crossing = sum(s / 2 ** (k + 1) for k in range(rounds))
    flat_rab = 2 * math.ceil(math.log2(p)) * a + 2 * g * crossing * b
    flat_rab += 2 * (s - crossing) * shm[1]  # the rounds inside the node
    node = best(g, s, *shm) if g > 1 else 0.0
    return {
        "flat ring": flat_ring,
        "flat Rabenseifner": flat_rab,
        "hierarchical": node + best(n, s, a, b),
    }


def project(
    links: dict, bucket_mb: float, per_node: int, compute: dict, models: dict | None = None
) -> dict:
    out: dict = {"links": links, "bucket_mb": bucket_mb, "models": {}, "hierarchical": {}}
    for model, (params, t_c, why) in (models or MODELS).items():
        t_c = compute.get(model, t_c)
        s = 4.0 * params
        rows = []
        for name, link in links.items():
            if name == "shm":
                continue
            alpha, beta = link["alpha_us"] * 1e-6, link["beta_ns_per_byte"] * 1e-9
            for n in NODES:
                times = {k: f(n, s, alpha, beta) for k, f in ALGORITHMS.items()}
                plain = step_time(t_c, n, s, alpha, beta, bucket_mb * 1e6, False)
                hidden = step_time(t_c, n, s, alpha, beta, bucket_mb * 1e6, True)
                rows.append(
                    {
                        "link": name,
                        "nodes": n,
                        **{f"{k} ms": 1e3 * v for k, v in times.items()},
                        "ring bound ms": 1e3 * 2 * (n - 1) / n * s * beta,
                        "step ms": 1e3 * plain,
                        "efficiency": t_c / plain,
                        "step ms, overlap": 1e3 * hidden,
                        "efficiency, overlap": t_c / hidden,
                        "T_c for 90 % ms": 1e3 * 9 * min(times.values()),
                    }
                )
        out["models"][model] = {
            "params": params,
            "bytes": s,
            "compute_ms": 1e3 * t_c,
            "why": why,
            "rows": rows,
        }
        if "shm" in links and per_node > 1:
            shm = (links["shm"]["alpha_us"] * 1e-6, links["shm"]["beta_ns_per_byte"] * 1e-9)
            hier = []
            for name, link in links.items():
                if name == "shm":
                    continue
                net = (link["alpha_us"] * 1e-6, link["beta_ns_per_byte"] * 1e-9)
                for n in NODES:
                    times = hierarchical(n, per_node, s, net, shm)
                    hier.append(
                        {"link": name, "nodes": n, **{f"{k} ms": 1e3 * v for k, v in times.items()}}
                    )
            out["hierarchical"][model] = {"per_node": per_node, "rows": hier}
    return out


def _link(measured: dict) -> dict:
    """alpha from the fit over all sizes; beta from the largest message
    measured (gradients are large, and the per-byte time of big messages
    is what they meet: on this VM's shared memory it is 2-3x the fit's,
    once the message no longer fits in cache)."""
    largest = max(measured["ms"], key=int)
    beta_large = 1e6 * measured["ms"][largest] / int(largest)
    return {
        "alpha_us": measured["alpha_us"],
        "beta_ns_per_byte": max(measured["beta_ns_per_byte"], beta_large),
        "beta_fit_ns_per_byte": measured["beta_ns_per_byte"],
        "largest_bytes": int(largest),
    }


def _node_table(result: dict, columns: list[str], cells) -> list[str]:
    """A markdown table, a row per node count and, per link, `columns`
    filled by `cells(row)` from that link's row of `result`."""
    links = list(dict.fromkeys(r["link"] for r in result["rows"]))
    head = ["nodes"] + [
        f"{link}: {c}" if i == 0 else c for link in links for i, c in enumerate(columns)
    ]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in NODES:
        row = [str(n)]
        for link in links:
            row += cells(next(r for r in result["rows"] if r["link"] == link and r["nodes"] == n))
        out.append("| " + " | ".join(row) + " |")
    return out


def markdown(data: dict) -> str:
    """The doc's tables: per model, per node count, each link's allreduce
    (the cheapest algorithm), efficiency without and with overlap; and the
    hierarchical comparison."""
    out = []
    for model, result in data["models"].items():
        out.append(
            f"**{model}**: {result['params']:,} parameters ({result['bytes'] / 1e6:.1f} MB), "
            f"compute {result['compute_ms']:.0f} ms per step assumed ({result['why']}).\n"
        )
        out += _node_table(
            result,
            ["allreduce ms", "eff.", "eff. with overlap"],
            lambda r: [
                f"{min(r[f'{k} ms'] for k in ALGORITHMS):,.1f}",
                f"{r['efficiency']:.2f}",
                f"{r['efficiency, overlap']:.2f}",
            ],
        )
        out.append("")
    for model, result in data["hierarchical"].items():
        out.append(f"**{model}**, {result['per_node']} ranks per node, allreduce ms:\n")
        out += _node_table(
            result,
            ["flat ring", "flat Rabenseifner", "node-local first"],
            lambda r: [
                f"{r['flat ring ms']:,.1f}",
                f"{r['flat Rabenseifner ms']:,.1f}",
                f"{r['hierarchical ms']:,.1f}",
            ],
        )
        out.append("")
    return "\n".join(out)


def _print_rows(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(
            " | ".join(
                f"{v:.3g}"
                if isinstance(v, float) and v < 1
                else f"{v:,.1f}"
                if isinstance(v, float)
                else str(v)
                for v in row.values()
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--links",
        default=str(ROOT / "docs" / "overlap.json"),
        help="overlap.py's JSON with the measured links; none: only --link",
    )
    parser.add_argument(
        "--link", action="append", default=[], help="name:alpha_us:GB/s, added by hand"
    )
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--per-node", type=int, default=4, help="ranks per node (hierarchical)")
    parser.add_argument(
        "--compute-ms", action="append", default=[], help="MODEL=ms, e.g. ResNet-50=100"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=parameters:compute_ms, replacing the default two (e.g. ResNet-101=44549160:620)",
    )
    parser.add_argument("--out", default=str(ROOT / "results" / "cost_model"))
    parser.add_argument("--markdown", action="store_true", help="print the doc's tables only")
    args = parser.parse_args()
    links = {}
    if args.links != "none" and Path(args.links).exists():
        measured = json.loads(Path(args.links).read_text())["links"]
        links = {k: _link(v) for k, v in measured.items()}
    for spec in args.link:
        name, alpha_us, gbps = spec.split(":")
        links[name] = {"alpha_us": float(alpha_us), "beta_ns_per_byte": 1.0 / float(gbps)}
    if not links:
        print(f"no links: run benchmarks/overlap.py (it writes {args.links}) or give --link")
        return 2
    compute = {k: float(v) / 1e3 for k, v in (c.split("=") for c in args.compute_ms)}
    models = None
    if args.model:
        models = {}
        for spec in args.model:
            name, rest = spec.split("=")
            params, ms = rest.split(":")
            models[name] = (int(params), float(ms) / 1e3, "given with --model")
    data = project(links, args.bucket_mb, args.per_node, compute, models)
    if args.markdown:
        print(markdown(data))
        return 0
    for name, link in links.items():
        print(
            f"{name}: alpha {link['alpha_us']:.1f} us, beta {link['beta_ns_per_byte']:.4f} ns/B "
            f"({1 / link['beta_ns_per_byte']:.3f} GB/s)"
        )
    for model, result in data["models"].items():
        print(
            f"\n{model}: {result['params']:,} parameters ({result['bytes'] / 1e6:.1f} MB), "
            f"compute {result['compute_ms']:.0f} ms/step assumed ({result['why']})"
        )
        _print_rows(result["rows"])
    for model, result in data["hierarchical"].items():
        print(f"\n{model}, {result['per_node']} ranks per node: allreduce ms")
        _print_rows(result["rows"])
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
