"""Recall@K / MRR against brute-force references (explicit stable sort per query)."""

import numpy as np
import pytest

from elva_jax.retrieval import (
    mrr_from_topk,
    ranks_of_first_relevant,
    recall_at_k,
    recall_from_topk,
    recall_table,
)


def _ref_recall(scores, relevant, k):
    hits = []
    for s, rel in zip(scores, relevant):
        order = sorted(range(len(s)), key=lambda c: (-s[c], c))  # stable descending
        hits.append(any(rel[c] for c in order[:k]))
    return float(np.mean(hits))


def _random_case(seed, n_q=40, n_c=60):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal((n_q, n_c)), 1).astype(np.float32)  # many ties
    relevant = rng.random((n_q, n_c)) < 0.05
    relevant[np.arange(n_q), rng.integers(0, n_c, n_q)] = True  # >= 1 positive per query
    return scores, relevant


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 10, 59, 60, 100])
def test_recall_at_k_matches_bruteforce(seed, k):
    scores, relevant = _random_case(seed)
    assert (relevant.sum(axis=1) > 1).any()  # multiple positives exercised
    assert recall_at_k(scores, relevant, k) == pytest.approx(_ref_recall(scores, relevant, k), abs=0)


def test_ranks_match_stable_argsort():
    scores, relevant = _random_case(3)
    order = np.argsort(-scores, axis=1, kind="stable")
    ref = [int(np.flatnonzero(rel[o])[0]) for o, rel in zip(order, relevant)]
    np.testing.assert_array_equal(ranks_of_first_relevant(scores, relevant), ref)


def test_recall_hand_computed():
    scores = np.array([[0.9, 0.5, 0.9, 0.1], [0.2, 0.8, 0.8, 0.8]])
    relevant = np.array([[0, 0, 1, 0], [1, 0, 0, 1]], bool)
    # row 0: positive 2 ties with 0.9 at index 0 -> rank 1. row 1: best positive is 3 (0.8),
    # behind indices 1 and 2 at the same score -> rank 2.
    np.testing.assert_array_equal(ranks_of_first_relevant(scores, relevant), [1, 2])
    assert recall_at_k(scores, relevant, 1) == 0.0
    assert recall_at_k(scores, relevant, 2) == 0.5
    assert recall_at_k(scores, relevant, 3) == 1.0
    topk = np.argsort(-scores, axis=1, kind="stable")
    assert recall_from_topk(topk, relevant, 2) == 0.5
    assert recall_from_topk(topk, [{2}, [0, 3]], 3) == 1.0
    assert mrr_from_topk(topk, relevant) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert mrr_from_topk(topk, relevant, k=2) == pytest.approx(0.25)
    assert recall_table(topk, relevant, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_no_positive_raises_with_row():
    scores, relevant = _random_case(4)
    relevant[7] = False
    with pytest.raises(ValueError, match="query row 7"):
        recall_at_k(scores, relevant, 5)
    topk = np.argsort(-scores, axis=1)[:, :10]
    with pytest.raises(ValueError, match="query row 7"):
        recall_from_topk(topk, relevant, 5)
    sets = [set(np.flatnonzero(r)) for r in relevant]
    with pytest.raises(ValueError, match="query row 7"):
        recall_from_topk(topk, sets, 5)


def test_bad_inputs():
    scores, relevant = _random_case(5)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(scores, relevant, 0)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.where(relevant, np.nan, scores), relevant, 1)
    topk = np.argsort(-scores, axis=1)[:, :10]
    with pytest.raises(ValueError, match="exceeds"):
        recall_from_topk(topk, relevant, 11)
    with pytest.raises(ValueError, match="exceeds"):
        recall_table(topk, relevant)  # default ks include 50


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_metrics_from_sets_and_matrix_agree(seed):
    scores, relevant = _random_case(seed)
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :50]
    topk[0, -1] = -1  # padding entries are never relevant
    sets = [np.flatnonzero(r).tolist() for r in relevant]
    for k in (1, 5, 10, 49):
        expected = _ref_recall(scores, relevant, k)
        assert recall_from_topk(topk, relevant, k) == pytest.approx(expected, abs=0)
        assert recall_from_topk(topk, sets, k) == pytest.approx(expected, abs=0)
    assert recall_table(topk, sets) == recall_table(topk, relevant)
    ref_mrr = np.mean([1.0 / (1 + r) if r < 50 else 0.0 for r in ranks_of_first_relevant(scores, relevant)])
    assert mrr_from_topk(topk[:, :49], sets) == pytest.approx(
        np.mean([1.0 / (1 + r) if r < 49 else 0.0 for r in ranks_of_first_relevant(scores, relevant)])
    )
    assert mrr_from_topk(topk[:, :49], relevant) == mrr_from_topk(topk[:, :49], sets)
    assert ref_mrr >= mrr_from_topk(topk[:, :49], sets)
