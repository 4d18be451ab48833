"""Order among exactly tied scores: elva_jax's rule and a model of faiss's CPU flat index.

elva_jax ranks by (score descending, candidate index ascending), a stable descending sort. UniIR
ranks with faiss ``IndexFlatIP.search``, whose CPU search (``knn_inner_product``; for 1 < k < 100 a
``HeapBlockResultHandler``, the same rule on its sequential and BLAS paths) streams the candidates in
index order into a size-k min-heap ordered by (score, index):

* a candidate enters only if its score is *strictly* above the heap's root (the k-th best so far):
  a candidate tied with the k-th best of the prefix is dropped;
* entering evicts the root: the lowest-index candidate among those with the smallest score;
* the result is the heap popped in order: (score descending, index *descending*).

So at the k-th place faiss keeps the tied candidates that arrived while fewer than k candidates
scored at least as high, minus one (the lowest index) for every strictly better candidate that
arrived afterwards; and among kept ties it lists the higher index first.

Not modelled: ``k == 1`` on faiss's BLAS path (``n_q * d >= 128,000``; its ``Top1BlockResultHandler``
reduces over SIMD lanes, so which tied maximum wins depends on the lane width; on the sequential path
it is the first maximum, which this model gives); ``k >= 100`` (a reservoir with fuzzy partitioning);
the database-parallel search (fewer queries than threads over >= 10k candidates, faiss >= 1.15); and
faiss's GPU k-selection. Source: faiss ``utils/distances.cpp``, ``impl/ResultHandler.h``, ``utils/Heap.h``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FAISS_MAX_K", "TIE_ORDERS", "faiss_flat_order"]

TIE_ORDERS = ("index", "faiss")
FAISS_MAX_K = 99  # faiss's heap path: k < distance_compute_min_k_reservoir (100)


def _faiss_one(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query: faiss's kept k of the candidates (vals, ids), which hold every score >= the k-th best."""
    kth = np.sort(vals)[::-1][k - 1]
    rel = np.flatnonzero(vals >= kth)
    rel = rel[np.argsort(ids[rel], kind="stable")]  # arrival order = candidate index
    kept_ties: list[int] = []  # tied candidates in the heap, in arrival (= index) order
    seen = 0  # candidates of the prefix scoring >= kth: the heap's root is kth once seen >= k
    for r in rel:
        if vals[r] == kth:
            if seen < k:
                kept_ties.append(r)
        elif seen >= k:  # strictly better, heap root is a tied candidate: the lowest index is evicted
            kept_ties.pop(0)
        seen += 1
    keep = np.concatenate([np.flatnonzero(vals > kth), np.asarray(kept_ties, np.int64)])
    order = np.lexsort((-ids[keep], -vals[keep]))  # score desc, then index desc
    keep = keep[order]
    return vals[keep], ids[keep]


def faiss_flat_order(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss ``IndexFlatIP`` (CPU) top-k from candidate lists that contain every tie at the k-th place.

    Args:
      scores, indices: [Q, K'] (K' >= k), per query every candidate whose score is >= its k-th best
        (e.g. a stable top-K' whose K'-th score is below the k-th, or the whole pool), any order.
      k: 1 <= k <= FAISS_MAX_K.

    Returns:
      (scores [Q, k] float32, indices [Q, k] int64) as faiss returns them (see the module docstring).
    """
    scores, indices = np.asarray(scores), np.asarray(indices)
    if not 1 <= k <= min(FAISS_MAX_K, scores.shape[1]):
        raise ValueError(f"faiss tie order needs 1 <= k <= {FAISS_MAX_K} and k <= {scores.shape[1]}, got k={k}")
    out_v = np.empty((scores.shape[0], k), np.float32)
    out_i = np.empty((scores.shape[0], k), np.int64)
    for q in range(scores.shape[0]):
        out_v[q], out_i[q] = _faiss_one(scores[q].astype(np.float32), indices[q].astype(np.int64), k)
    return out_v, out_i
