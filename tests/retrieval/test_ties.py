"""Tie order of Recall@K ranking: elva_jax's lower-index rule and the model of faiss's CPU IndexFlatIP.

Oracle: a literal transcription of faiss's heap search (a Python ``heapq`` min-heap of (score, index):
a candidate enters only if its score is strictly above the root, the root is evicted, the result is the
heap sorted by (score, index) descending), and faiss itself when faiss-cpu is installed.
"""

import heapq

import numpy as np
import pytest

from elva_jax.retrieval.ties import faiss_flat_order
from elva_jax.retrieval.topk import streaming_topk


def heap_search(scores: np.ndarray, k: int) -> np.ndarray:
    """faiss's HeapBlockResultHandler, transcribed: stream candidates in index order into a size-k heap."""
    out = []
    for row in scores:
        heap = [(-np.inf, -1)] * k  # heap_heapify: k sentinels (lowest, -1)
        for j, s in enumerate(row.tolist()):
            if s > heap[0][0]:  # C::cmp(threshold, dis): strictly better than the root
                heapq.heapreplace(heap, (s, j))  # the root is the (score, index) minimum
        out.append([j for _, j in sorted(heap, reverse=True)])
    return np.asarray(out, np.int64)


def tied_scores(rng, n_q, n_c, levels=3, d=6):
    """Integer-valued vectors drawn from a few distinct rows: many exactly tied scores, exact in fp32."""
    base = rng.integers(-2, 3, size=(levels, d)).astype(np.float32)
    cands = base[rng.integers(0, levels, size=n_c)]
    queries = rng.integers(-2, 3, size=(n_q, d)).astype(np.float32)
    return queries, cands


def test_hand_case():
    # k = 2 over scores [1, 1, 1, 2]: faiss keeps candidate 1 (0 is evicted by 3, 2 never enters), lists 3 first
    s = np.array([[1.0, 1.0, 1.0, 2.0]], np.float32)
    ids = np.arange(4)[None]
    assert faiss_flat_order(s, ids, 2)[1].tolist() == [[3, 1]]
    assert heap_search(s, 2).tolist() == [[3, 1]]
    # ties above the k-th place are listed higher index first; k = 1 keeps the first maximum
    s = np.array([[5.0, 5.0, 1.0, 1.0]], np.float32)
    assert faiss_flat_order(s, ids, 3)[1].tolist() == [[1, 0, 2]]
    assert faiss_flat_order(s, ids, 1)[1].tolist() == [[0]]


@pytest.mark.parametrize("seed", range(4))
def test_model_equals_the_heap_transcription(seed):
    rng = np.random.default_rng(seed)
    q, c = tied_scores(rng, 20, 60)
    s = q @ c.T
    ids = np.broadcast_to(np.arange(60), s.shape)
    for k in (1, 2, 5, 17, 60):
        np.testing.assert_array_equal(faiss_flat_order(s, ids, k)[1], heap_search(s, k))


def test_streaming_topk_faiss_order_and_index_order():
    rng = np.random.default_rng(11)
    # 2 levels over 300 candidates: tie groups far longer than 2k + 16, so the stable top-k must widen
    q, c = tied_scores(rng, 7, 300, levels=2)
    s = q @ c.T
    for k in (1, 3, 10, 50):
        _, got = streaming_topk(q, c, k, chunk_size=64, tie_order="faiss")
        np.testing.assert_array_equal(got, heap_search(s, k))
        _, idx = streaming_topk(q, c, k, chunk_size=64)
        np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :k])
    # the two rules differ on these ties (else this test could not tell them apart)
    assert not np.array_equal(streaming_topk(q, c, 10, tie_order="faiss")[1], streaming_topk(q, c, 10)[1])


def test_faiss_order_refuses_the_reservoir_range():
    q, c = tied_scores(np.random.default_rng(0), 2, 200)
    with pytest.raises(ValueError, match="k <= 99"):
        streaming_topk(q, c, 100, tie_order="faiss")
    with pytest.raises(ValueError, match="tie_order"):
        streaming_topk(q, c, 5, tie_order="sorted")


def test_against_faiss_itself():
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)  # faiss's database-parallel path (few queries, >= 10k candidates) is not modelled
    rng = np.random.default_rng(5)
    # (20 queries, d 6): faiss's sequential path; (250, 600): its BLAS path (n_q * d >= 128,000)
    for n_q, d in ((20, 6), (250, 600)):
        q, c = tied_scores(rng, n_q, 257, levels=4, d=d)
        index = faiss.IndexFlatIP(d)
        index.add(c)
        # k = 1 on the BLAS path reduces over SIMD lanes (not modelled, see elva_jax.retrieval.ties)
        for k in (1, 4, 50, 99) if d < 100 else (4, 50, 99):
            want_d, want_i = index.search(q, k)
            got_d, got_i = streaming_topk(q, c, k, chunk_size=128, tie_order="faiss")
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_array_equal(got_d, want_d)
