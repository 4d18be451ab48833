"""Retrieval metrics with UniIR M-BEIR semantics (numpy only).

Ranking convention everywhere: candidates are ordered by (score descending, candidate index
ascending), i.e. a stable descending sort, so ties go to the lower candidate index.

Recall@K (UniIR): a query is a hit if ANY of its relevant candidates is among its top K;
Recall@K = mean over queries of hit. Queries without any relevant candidate are an error (UniIR
only evaluates queries that have qrels positives).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["mrr_from_topk", "recall_at_k", "recall_from_topk", "recall_table", "ranks_of_first_relevant"]

# Rows of the [Q, C] score matrix handled per step, to bound temporaries to ~_ROW_BLOCK * C.
_ROW_BLOCK = 256


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def ranks_of_first_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-ranked relevant candidate, without sorting.

    scores [Q, C] float, relevant [Q, C] bool -> ranks [Q] int64. With s* the highest relevant score
    and j* the lowest relevant index attaining it:
    ``rank = #{c : s_c > s*} + #{c : s_c == s* and c < j*}``.
    Raises ValueError on a query row with no relevant candidate, or on NaN scores.
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must both be [Q, C]")
    empty = ~relevant.any(axis=1)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(f"query row {row} has no relevant candidate (UniIR evaluates only queries with positives)")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_q, n_c = scores.shape
    ranks = np.empty(n_q, dtype=np.int64)
    col = np.arange(n_c)
    for r0 in range(0, n_q, _ROW_BLOCK):
        s = scores[r0 : r0 + _ROW_BLOCK]
        rel = relevant[r0 : r0 + _ROW_BLOCK]
        # Best relevant score per row; rows are guaranteed to have one.
        best = np.where(rel, s, -np.inf).max(axis=1, keepdims=True)
        at_best = s == best
        j_star = np.argmax(rel & at_best, axis=1)[:, None]  # lowest relevant index with score s*
        ranks[r0 : r0 + _ROW_BLOCK] = (s > best).sum(axis=1) + (at_best & (col < j_star)).sum(axis=1)
    return ranks


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """UniIR Recall@k from a dense score matrix.

    scores [Q, C] float, relevant [Q, C] bool. hit_q = 1[rank_q < k] with rank_q the 0-based rank
    (stable descending sort) of q's best relevant candidate; returns mean_q hit_q.
    Raises ValueError naming the first query row without a relevant candidate.
    """
    k = _check_k(k)
    return float(np.mean(ranks_of_first_relevant(scores, relevant) < k))


def _relevance_hits(topk_indices: np.ndarray, relevant) -> np.ndarray:
    """Bool [Q, K']: is topk_indices[q, j] relevant to q.

    ``relevant`` is either a bool matrix [Q, C] or a length-Q sequence of collections of
    candidate indices. Negative / out-of-range indices (padding) are never relevant.
    Raises ValueError for a query with no relevant candidate.
    """
    topk = np.asarray(topk_indices)
    if topk.ndim != 2:
        raise ValueError(f"topk_indices must be [Q, K'], got shape {topk.shape}")
    n_q = topk.shape[0]
    if isinstance(relevant, np.ndarray) and relevant.ndim == 2:
        rel = relevant.astype(bool, copy=False)
        if rel.shape[0] != n_q:
            raise ValueError(f"relevant has {rel.shape[0]} rows, topk_indices has {n_q}")
        empty = ~rel.any(axis=1)
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise ValueError(f"query row {row} has no relevant candidate")
        valid = (topk >= 0) & (topk < rel.shape[1])
        safe = np.where(valid, topk, 0)
        return valid & np.take_along_axis(rel, safe, axis=1)
    sets: Sequence[Iterable[int]] = list(relevant)
    if len(sets) != n_q:
        raise ValueError(f"relevant has {len(sets)} entries, topk_indices has {n_q} rows")
    rows, cands = [], []
    for q, s in enumerate(sets):
        ids = np.fromiter((int(c) for c in s), dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"query row {q} has no relevant candidate")
        rows.append(np.full(ids.size, q, dtype=np.int64))
        cands.append(ids)
    rows_a, cands_a = np.concatenate(rows), np.concatenate(cands)
    # Encode (query, candidate) pairs as one int64 key; membership by np.isin.
    span = int(max(cands_a.max(), topk.max(initial=0))) + 2
    rel_keys = rows_a * span + cands_a
    topk64 = topk.astype(np.int64)
    valid = topk64 >= 0
    keys = np.arange(n_q, dtype=np.int64)[:, None] * span + np.where(valid, topk64, span - 1)
    return valid & np.isin(keys, rel_keys)


def recall_from_topk(topk_indices: np.ndarray, relevant, k: int) -> float:
    """UniIR Recall@k from ranked index lists (e.g. ``streaming_topk`` output).

    topk_indices [Q, K'] int, best first, K' >= k; relevant: bool [Q, C] or per-query collections
    of relevant candidate indices. hit_q = any(topk_indices[q, :k] relevant); returns mean_q hit_q.
    """
    k = _check_k(k)
    topk = np.asarray(topk_indices)
    if topk.ndim == 2 and k > topk.shape[1]:
        raise ValueError(f"k={k} exceeds the {topk.shape[1]} ranked indices available per query")
    hits = _relevance_hits(topk, relevant)
    return float(np.mean(hits[:, :k].any(axis=1)))


def mrr_from_topk(topk_indices: np.ndarray, relevant, k: int | None = None) -> float:
    """Mean reciprocal rank truncated at k (default K'): mean_q 1/(1 + first relevant position), 0 if none."""
    topk = np.asarray(topk_indices)
    hits = _relevance_hits(topk, relevant)
    if k is not None:
        k = _check_k(k)
        if k > hits.shape[1]:
            raise ValueError(f"k={k} exceeds the {hits.shape[1]} ranked indices available per query")
        hits = hits[:, :k]
    first = np.argmax(hits, axis=1)
    rr = np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return float(np.mean(rr))


def recall_table(topk_indices: np.ndarray, relevant, ks: Sequence[int] = (1, 5, 10, 50)) -> dict[int, float]:
    """{k: Recall@k} for each k in ks from one ranked list [Q, K'] (every k must be <= K')."""
    topk = np.asarray(topk_indices)
    hits = _relevance_hits(topk, relevant)
    out: dict[int, float] = {}
    for k in ks:
        k = _check_k(k)
        if k > hits.shape[1]:
            raise ValueError(f"k={k} exceeds the {hits.shape[1]} ranked indices available per query")
        out[k] = float(np.mean(hits[:, :k].any(axis=1)))
    return out


__all__ += ["ndcg_from_topk"]


def ndcg_from_topk(topk_indices: np.ndarray, gains: Sequence[dict], k: int, form: str = "linear") -> np.ndarray:
    """Per-query NDCG@k from ranked index lists (VLM2Vec ``RankingMetrics.ndcg_at_k``).

    topk_indices [Q, K'] int, best first (negative = padding, gain 0); gains: per query a mapping
    candidate index -> relevance grade r > 0 (binary relevance: every r = 1). With g(r) = r ("linear")
    or 2**r - 1 ("exponential"): DCG@k = sum_{j<k} g(r(topk[q, j])) / log2(j + 2); IDCG@k the same over
    the query's grades sorted descending; returns [Q] float64 DCG / IDCG. A query without any grade > 0
    raises ValueError (its NDCG is undefined).
    """
    k = _check_k(k)
    if form not in ("linear", "exponential"):
        raise ValueError(f"form must be 'linear' or 'exponential', got {form!r}")
    topk = np.asarray(topk_indices)
    if topk.ndim != 2 or len(gains) != topk.shape[0]:
        raise ValueError(f"topk_indices {topk.shape} must be [Q, K'] with Q = len(gains) = {len(gains)}")
    g = (lambda r: r) if form == "linear" else (lambda r: 2.0**r - 1.0)

    def dcg(grades) -> float:  # left-to-right float64 sum of g(r_j) / log2(j + 2): fixes the rounding
        return sum(float(g(r)) / float(np.log2(j + 2.0)) for j, r in enumerate(grades))

    out = np.empty(topk.shape[0], dtype=np.float64)
    for q, grades in enumerate(gains):
        pos = {int(c): float(r) for c, r in grades.items() if r > 0}
        if not pos:
            raise ValueError(f"query row {q} has no relevant candidate (grade > 0)")
        got = [pos.get(int(c), 0.0) if c >= 0 else 0.0 for c in topk[q, :k]]
        out[q] = dcg(got) / dcg(sorted(pos.values(), reverse=True)[:k])
    return out
