"""Search benchmark: query latency and queries/s of the search index kinds, exact vs approximate.

Workload: synthetic clustered vectors (`Clusters`: n / --per-cluster Gaussian clusters in a
--latent dimensional space, mapped linearly to --dim dimensions), L2-normalized as a served
folder is; the queries are fresh draws from the same clusters, not rows of the index. For
each size and index kind (mixres.search.kinds, with the defaults `auto` would use):

    build      seconds to build the index from the vectors (what a first start pays; later
               starts load it from the folder's cache)
    latency    p50 / p99 of one query at a time (what one search request waits on the index)
    queries/s  one at a time, and in batches of --batch (a burst the engine batched)
    recall@10  of the top 10 against the exact (flat) index's top 10 on the same queries

All in one process: indexes built with --threads faiss threads, searched with
--query-threads. Writes results.json and results.md into --out.

    mixres bench search --out benchmarks/results/search-cpu        # 10k and 1M, a few minutes
    mixres bench search --sizes 10000 --out out/bench-search-q     # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixres.bench.report import command_line, write_json
from mixres.search.index import SearchIndex
from mixres.search.kinds import EXACT_MAX, choose_kind, faiss_module, l2_normalize


@dataclass
class Clusters:
    """Where the vectors live: clusters in a low-dimensional latent space, mapped linearly to dim.

    Image embeddings have a low intrinsic dimension; isotropic Gaussians in 256 dimensions would
    make every point's neighbours nearly random and no approximate index could find them.
    """

    centers: np.ndarray  # (clusters, latent)
    lift: np.ndarray     # (latent, dim)
    spread: float
    noise: float = 0.05

    @classmethod
    def make(cls, clusters: int, latent: int, dim: int, spread: float, seed: int) -> Clusters:
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal((clusters, latent), dtype=np.float32),
                   rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent), spread)

    def draw(self, n: int, seed: int) -> np.ndarray:
        """(n, dim) L2-normalized float32 vectors, made in chunks (no full-size temporaries)."""
        rng = np.random.default_rng(seed)
        latent, dim = self.lift.shape
        out = np.empty((n, dim), np.float32)
        for a in range(0, n, 65536):
            b = min(n, a + 65536)
            z = self.centers[rng.integers(0, len(self.centers), b - a)]
            z = z + self.spread * rng.standard_normal((b - a, latent), dtype=np.float32)
            noise = self.noise * rng.standard_normal((b - a, dim), dtype=np.float32)
            out[a:b] = l2_normalize(z @ self.lift + noise)
        return out


def _time_single(index: SearchIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    lat = []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k)
        lat.append(time.perf_counter() - t)
    return np.array(lat), len(queries) / (time.perf_counter() - t0)


def _time_batched(index: SearchIndex, queries: np.ndarray, k: int, batch: int) -> float:
    t0 = time.perf_counter()
    for a in range(0, len(queries), batch):
        index.search(queries[a:a + batch], k)
    return len(queries) / (time.perf_counter() - t0)


def _measure(index: SearchIndex, queries: np.ndarray, truth, args) -> dict:
    index.search(queries[:8], args.k)  # warm up
    lat, qps = _time_single(index, queries, args.k)
    qps_batch = _time_batched(index, queries, args.k, args.batch)
    ids = index.search(queries, args.k)[1]
    recall = None if truth is None else float(np.mean([len(set(a) & set(b)) / args.k
                                                       for a, b in zip(ids, truth)]))
    return {"p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "qps_single": qps, "qps_batched": qps_batch, f"recall@{args.k}": recall, "ids": ids}


def bench_size(n: int, args) -> list[dict]:
    space = Clusters.make(max(1, n // args.per_cluster), args.latent, args.dim, args.spread, args.seed)
    x, queries = space.draw(n, args.seed + 1), space.draw(args.queries, args.seed + 2)
    rows, truth = [], None
    for kind in args.kinds:
        if kind == "hnsw" and n > args.hnsw_max:
            continue
        faiss_module().omp_set_num_threads(args.threads)
        t = time.perf_counter()
        index = SearchIndex.build(x, kind, normalize=False)
        build = time.perf_counter() - t
        faiss_module().omp_set_num_threads(args.query_threads)
        # ivf: its default nprobe, then the others asked for on the same index (recall vs speed)
        probes = [None] + ([p for p in args.ivf_nprobe if p != index.index.nprobe] if kind == "ivf" else [])
        for probe in probes:
            if probe is not None:
                index.index.nprobe = probe
            row = {"n": n, "kind": kind, "params": index.kind.describe(), "build_s": build,
                   "auto": choose_kind("auto", n).name == kind and probe is None,
                   "index_mb": index.index.ntotal * args.dim * 4 / 2**20,
                   **_measure(index, queries, truth, args)}
            if kind == "ivf":
                row["nlist"], row["nprobe"] = int(index.index.nlist), int(index.index.nprobe)
            if kind == "flat":  # the reference the others' recall is measured against
                truth, row[f"recall@{args.k}"] = row["ids"], 1.0
            row.pop("ids")
            rows.append(row)
            print(f"n={n:,} {kind}{'' if probe is None else f' nprobe {probe}'}: build {build:.1f} s, "
                  f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                  f"{row['qps_single']:.0f} q/s single, {row['qps_batched']:.0f} q/s batched, "
                  f"recall@{args.k} {row[f'recall@{args.k}']}", flush=True)
        del index
        gc.collect()
    return rows


def write_markdown(res: dict, path: Path) -> None:
    k = res["k"]
    lines = ["# Search index: query latency and queries/s on CPU", "",
             f"Synthetic clustered vectors, dimension {res['dim']}: n / {res['per_cluster']:,} clusters in a "
             f"{res['latent']}-dimensional latent space (spread {res['spread']} around unit-normal "
             f"centres), mapped linearly to {res['dim']} dimensions plus a little noise, L2-normalized; "
             f"{res['queries']} fresh queries from the same clusters; top {k}. Built with "
             f"{res['threads']} faiss threads, searched with {res['query_threads']}. Batched: {res['batch']} "
             f"queries per call. Recall@{k} against the exact (flat) index on the same queries. "
             f"`auto` picks flat up to {res['exact_max']:,} vectors and ivf above.", "",
             f"Command: `{res['command']}`", "",
             f"| vectors | index | auto | build s | p50 ms | p99 ms | queries/s (one at a time) | "
             f"queries/s (batched) | vs flat (one at a time) | recall@{k} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["n"] == n]
        flat = next((r for r in rows if r["kind"] == "flat"), None)
        for j, r in enumerate(rows):
            ratio = f"{r['qps_single'] / flat['qps_single']:.1f}x" if flat else "-"
            rec = "exact" if r["kind"] == "flat" else f"{r[f'recall@{k}']:.3f}"
            name = r["kind"] + (f" (nlist {r['nlist']}, nprobe {r['nprobe']})" if r["kind"] == "ivf" else "")
            build = "same" if j and r["kind"] == rows[j - 1]["kind"] else f"{r['build_s']:.1f}"
            lines.append(f"| {n:,} | {name} | {'yes' if r['auto'] else ''} | {build} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['qps_single']:.0f} | "
                         f"{r['qps_batched']:.0f} | {ratio} | {rec} |")
    lines += ["", f"Machine: {res['machine']} ({res['cpu_count']} CPUs), faiss {res['faiss']}, numpy "
              f"{res['numpy']}. Load average before / after: {res['load_before']} / {res['load_after']}.", ""]
    path.write_text("\n".join(lines))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10000,1000000", help="index sizes, comma-separated")
    p.add_argument("--dim", type=int, default=256, help="vector dimension")
    p.add_argument("--kinds", default="flat,ivf,hnsw", help="index kinds (flat first: recall's reference)")
    p.add_argument("--hnsw-max", type=int, default=100_000,
                   help="skip hnsw above this size (its build is minutes at 1M on 2 cores)")
    p.add_argument("--per-cluster", type=int, default=1000, help="vectors per cluster (n / this clusters)")
    p.add_argument("--latent", type=int, default=24, help="the vectors' intrinsic dimension")
    p.add_argument("--spread", type=float, default=0.5,
                   help="spread around a cluster centre, per latent dimension (centres: unit normal)")
    p.add_argument("--ivf-nprobe", default="16,250",
                   help="ivf: also search the same index with these nprobe (recall against speed)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss (OpenMP) threads to build")
    p.add_argument("--query-threads", type=int, default=1,
                   help="faiss threads to search (1: on a shared machine OpenMP's barriers cost more than "
                        "a small query's work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> int:
    import platform

    faiss = faiss_module()
    args.kinds = ["flat", *[k for k in args.kinds.split(",") if k != "flat"]]
    args.ivf_nprobe = [int(p) for p in args.ivf_nprobe.split(",") if p]
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += bench_size(n, args)
    res = {"command": command_line(), "dim": args.dim, "queries": args.queries, "batch": args.batch,
           "k": args.k, "threads": args.threads, "query_threads": args.query_threads,
           "per_cluster": args.per_cluster, "latent": args.latent,
           "spread": args.spread, "exact_max": EXACT_MAX,
           "faiss": faiss.__version__, "numpy": np.__version__,
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_before": load_before,
           "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    out = Path(args.out)
    write_json(res, out / "results.json")
    write_markdown(res, out / "results.md")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m mixres.bench.search",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
