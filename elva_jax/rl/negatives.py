"""Balanced negatives for the RL stage (paper: 50 hard + 50 random per query).

Hard: candidates ranked by the current model's cosine similarity to the query, excluding the query's
positives and anything above `threshold` (likely false negatives), top `n_hard` of the rest.
Random: `n_random` drawn uniformly (seeded per query) from the remaining pool, excluding positives,
the hard ones and every candidate found above the threshold.
Results are cached on disk (JSON keyed by a fingerprint of the inputs) and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np


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
) -> tuple[list[list[int]], dict]:
    """Per query: (hard + random pool indices), and stats (short lists, dropped false negatives).

    query_emb [Q, D], pool_emb [C, D] L2-normalised. search_k: how many nearest candidates to inspect
    (default n_hard + max |positives| + 64); candidates above the threshold beyond it cannot be seen, so
    the number of nearest candidates above the threshold is reported (`threshold_hits_at_cutoff`).
    """
    from elva_jax.retrieval.topk import streaming_topk

    Q, C = len(query_emb), len(pool_emb)
    max_pos = max((len(p) for p in positives), default=0)
    k = min(C, search_k or (n_hard + max_pos + 64))
    scores, idx = streaming_topk(
        np.asarray(query_emb, np.float32), np.asarray(pool_emb, np.float32), k, chunk_size=min(C, 65536)
    )
    out, dropped, short, cutoff_hits = [], 0, 0, 0
    for q in range(Q):
        pos = positives[q]
        hard, above = [], set()
        for s, j in zip(scores[q], idx[q]):
            j = int(j)
            if j in pos:
                continue
            if s > threshold:
                above.add(j)
                continue
            if len(hard) < n_hard:
                hard.append(j)
        dropped += len(above)
        if scores[q][-1] > threshold:
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
        "false_negatives_dropped": dropped,
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
