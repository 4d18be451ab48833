"""W3: exact top-k of Q queries over C x D fp32 candidates, elva_jax streaming_topk vs faiss-cpu.

    python -m elva_jax.bench.topk [--n-cand 1000000 --dim 512 --n-query 1000 --k 10 --reps 3]

Random unit-norm data (seeded). faiss ``IndexFlatIP`` (all cores via ``omp_set_num_threads``) and
``streaming_topk`` run in one process: one warm-up each, then ``reps`` interleaved timed runs (so
load from other processes hits both alike). Prints one JSON line: median seconds, queries/s,
query-candidate pairs/s, GFLOP/s (2*Q*C*D flop), the throughput ratio elva / faiss, and whether the
two top-k lists agree (exactly, and up to fp ties: same fp64-recomputed scores within 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from elva_jax.retrieval.topk import streaming_topk


def _unit_rows(rng: np.random.Generator, n: int, dim: int, block: int = 65536) -> np.ndarray:
    """[n, dim] fp32 rows ~ N(0, I) normalised to unit L2 norm, generated in blocks."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + block] = x
    return out


def _agreement(q: np.ndarray, c: np.ndarray, ia: np.ndarray, ib: np.ndarray, tol: float = 1e-5) -> tuple[float, float]:
    """(fraction of rows with identical index lists, fraction whose fp64 top-k scores match within tol)."""
    exact = float(np.mean(np.all(ia == ib, axis=1)))
    q64 = q.astype(np.float64)
    sa = np.einsum("qd,qkd->qk", q64, c[ia].astype(np.float64))
    sb = np.einsum("qd,qkd->qk", q64, c[ib].astype(np.float64))
    ties = float(np.mean(np.all(np.abs(np.sort(sa, axis=1) - np.sort(sb, axis=1)) <= tol, axis=1)))
    return exact, ties


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-cand", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-query", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--query-block-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cands = _unit_rows(rng, args.n_cand, args.dim)
    queries = _unit_rows(rng, args.n_query, args.dim)
    threads = os.cpu_count() or 1
    load_before = os.getloadavg()[0]

    def run_elva():
        return streaming_topk(
            queries, cands, args.k, chunk_size=args.chunk_size, query_block_size=args.query_block_size
        )

    try:
        import faiss  # local: heavy optional dependency (the bench extra)
    except ImportError:
        faiss = None
        print("faiss-cpu is not installed (pip install faiss-cpu); timing elva_jax only", flush=True)

    runners = {"elva": run_elva}
    result: dict = {
        "workload": "W3",
        "n_cand": args.n_cand,
        "dim": args.dim,
        "n_query": args.n_query,
        "k": args.k,
        "reps": args.reps,
        "chunk_size": args.chunk_size,
        "threads": threads,
        "jax": jax.__version__,
        "faiss": None if faiss is None else faiss.__version__,
    }
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(args.dim)
        t0 = time.perf_counter()
        index.add(cands)
        result["faiss_add_s"] = round(time.perf_counter() - t0, 4)
        runners["faiss"] = lambda: index.search(queries, args.k)  # (scores, indices)

    outs, times = {}, {name: [] for name in runners}
    for name, fn in runners.items():  # warm-up (compile for elva)
        t0 = time.perf_counter()
        outs[name] = fn()
        result[f"{name}_warmup_s"] = round(time.perf_counter() - t0, 4)
    for _ in range(args.reps):  # interleaved timed repetitions
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    flop = 2.0 * args.n_query * args.n_cand * args.dim
    for name in runners:
        med = statistics.median(times[name])
        result[f"{name}_s_median"] = round(med, 4)
        result[f"{name}_s_all"] = [round(t, 4) for t in times[name]]
        result[f"{name}_qps"] = round(args.n_query / med, 2)
        result[f"{name}_pairs_per_s"] = float(f"{args.n_query * args.n_cand / med:.4g}")
        result[f"{name}_gflops"] = round(flop / med / 1e9, 1)
    if faiss is not None:
        result["ratio_elva_over_faiss"] = round(result["faiss_s_median"] / result["elva_s_median"], 3)
        result["target"] = 0.8
        result["reached"] = result["ratio_elva_over_faiss"] >= 0.8
        exact, ties = _agreement(queries, cands, outs["elva"][1], outs["faiss"][1].astype(np.int64))
        result["agree_exact_rows"] = exact
        result["agree_up_to_ties_rows"] = ties
    result["loadavg_1m_before"] = round(load_before, 2)
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
