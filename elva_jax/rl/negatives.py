"""Balanced negatives for the RL stage (paper: 50 hard + 50 random per query).

Hard: candidates ranked by the current model's cosine similarity to the query, excluding the query's
positives and likely false negatives, top `n_hard` of the rest. False negatives are the candidates with
  - `filter_rule="absolute"`: score > `threshold` (the default, 0.95 in the presets), or
  - `filter_rule="relative"`: score > s_pos - `margin`, s_pos = the query's best positive score (UniME /
    Qwen3-VL-Embedding-style mask relative to the positive, margin 0.1; a negative margin drops only
    candidates scoring above the positive by more than |margin|). A query without a positive in the pool
    drops none (counted).
Random: `n_random` drawn uniformly (seeded per query) from the remaining pool, excluding positives,
the hard ones and every candidate found to be a false negative.
Results are cached on disk (JSON keyed by a fingerprint of the inputs) and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np

from elva_jax.retrieval.topk import streaming_topk

FILTERS = ("absolute", "relative")


def mine(
    query_emb: np.ndarray,
    pool_emb: np.ndarray,
    positives: list[set[int]],
    *,
    n_hard: int,
    n_random: int,
    threshold: float,
    seed: int = 0,
    search_k: int | None = None,
    filter_rule: str = "absolute",
    margin: float = 0.1,
) -> tuple[list[list[int]], dict]:
    """Per query: (hard + random pool indices), and stats (short lists, dropped false negatives).

    query_emb [Q, D], pool_emb [C, D] L2-normalised. search_k: how many nearest candidates to inspect
    (default n_hard + max |positives| + 64); false negatives beyond it cannot be seen, so the queries
    whose last inspected candidate is still above their cut are reported (`threshold_hits_at_cutoff`).
    stats["dropped_per_query"][q] is the number of candidates dropped as false negatives for query q;
    `dropped_mean` / `dropped_max` / `queries_with_drops` summarise it.
    """
    if filter_rule not in FILTERS:
        raise ValueError(f"false-negative filter_rule must be one of {FILTERS}, got {filter_rule!r}")
    Q, C = len(query_emb), len(pool_emb)
    max_pos = max((len(p) for p in positives), default=0)
    k = min(C, search_k or (n_hard + max_pos + 64))
    scores, idx = streaming_topk(
        np.asarray(query_emb, np.float32), np.asarray(pool_emb, np.float32), k, chunk_size=min(C, 65536)
    )
    q32, p32 = np.asarray(query_emb, np.float32), np.asarray(pool_emb, np.float32)
    out, dropped, short, cutoff_hits, no_pos = [], [], 0, 0, 0
    for q in range(Q):
        pos = positives[q]
        if filter_rule == "absolute":
            cut = threshold
        elif pos:
            cut = float(np.max(p32[sorted(pos)] @ q32[q])) - margin
        else:
            cut, no_pos = np.inf, no_pos + 1
        hard, above = [], set()
        for s, j in zip(scores[q], idx[q]):
            j = int(j)
            if j in pos:
                continue
            if s > cut:
                above.add(j)
                continue
            if len(hard) < n_hard:
                hard.append(j)
        dropped.append(len(above))
        if scores[q][-1] > cut:
            cutoff_hits += 1
        excluded = pos | above | set(hard)
        rng = np.random.default_rng([seed, zlib.crc32(str(q).encode())])
        avail = np.setdiff1d(np.arange(C), np.fromiter(excluded, int, len(excluded)), assume_unique=False)
        rand = rng.choice(avail, size=min(n_random, len(avail)), replace=False).tolist() if len(avail) else []
        if len(hard) < n_hard or len(rand) < n_random:
            short += 1
        out.append(hard + [int(r) for r in rand])
    return out, {
        "queries": Q,
        "filter": filter_rule if filter_rule == "absolute" else f"relative (margin {margin})",
        "false_negatives_dropped": int(sum(dropped)),
        "dropped_per_query": dropped,
        "dropped_mean": float(np.mean(dropped)) if dropped else 0.0,
        "dropped_max": int(max(dropped, default=0)),
        "queries_with_drops": int(sum(d > 0 for d in dropped)),
        "queries_without_positive": no_pos,
        "short_lists": short,
        "threshold_hits_at_cutoff": cutoff_hits,
        "search_k": k,
    }


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def mine_cached(cache_file: str, query_ids: list[str], pool_ids: list[str], query_emb, pool_emb, positives, **kw):
    """`mine` with an on-disk cache: {query id: [negative pool ids]} reused when the fingerprint matches."""
    fp = fingerprint(
        query_ids,
        pool_ids,
        np.asarray(query_emb, np.float32),
        np.asarray(pool_emb, np.float32),
        [sorted(p) for p in positives],
        kw,
    )
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            cached = json.load(f)
        if cached.get("fingerprint") == fp:
            return cached["negatives"], cached["stats"] | {"cache": "hit"}
    neg, stats = mine(query_emb, pool_emb, positives, **kw)
    result = {qid: [pool_ids[j] for j in n] for qid, n in zip(query_ids, neg)}
    os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
    tmp = cache_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fp, "negatives": result, "stats": stats}, f)
    os.replace(tmp, cache_file)
    return result, stats | {"cache": "miss"}
