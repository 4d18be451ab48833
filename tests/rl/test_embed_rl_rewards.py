"""Embed-RL rewards vs a plain numpy transcription of the official definitions (loops, float64), a
hand-computed 2-pair x 2-rollout case, ties (brute force over every order of the tied entries),
degenerate batches, jit, and a (2, 2, 2) mesh of 8 fake CPU devices (subprocess)."""

from __future__ import annotations

import functools
import itertools
import math
import os

import jax
import numpy as np
import pytest
from helpers.device_check import run_check

from elva_jax.rl import embed_rl_rewards as E
from elva_jax.rl.embed_rl_rewards import EmbedRLRewardConfig


# ------------------------------------------------------------------ numpy transcription (official)
def np_top_share(s, same, n, ties):
    """|top-n & same|: a stable sort by (-s, column) for "index"; for "average" the mean over every
    order of the columns (each order breaks ties its own way) -- brute force, small rows only."""
    P = len(s)
    if ties == "index":
        top = np.argsort(-s, kind="stable")[:n]
        return float(same[top].sum())
    assert P <= 7, "brute force over P! orders"
    total = 0.0
    perms = list(itertools.permutations(range(P)))
    for perm in perms:
        pos = {j: k for k, j in enumerate(perm)}
        order = sorted(range(P), key=lambda j: (-s[j], pos[j]))
        total += sum(same[j] for j in order[:n])
    return total / len(perms)


def np_orm_row(s, same, *, t=0.5, scale=0.5, top_n=0, ties="index"):
    """One row of the official compute_in_batch_orm_reward: n = own-pair count, torch.topk(row, n),
    acc = own-pair share of the top n, margin = own-pair mean - softmax(neg / t)-weighted negatives."""
    s = np.asarray(s, np.float64)
    same = np.asarray(same, bool)
    count = int(same.sum())
    n = count if top_n == 0 else min(top_n, len(s))
    acc = np_top_share(s, same, n, ties) / n if n > 0 else 0.0
    pos_mean = s[same].mean() if count else 0.0
    neg = s[~same]
    if len(neg):
        w = np.exp(neg / t - (neg / t).max())
        w = w / w.sum()
        neg_mean = float((w * neg).sum())
    else:
        neg_mean = 0.0
    margin = pos_mean - neg_mean
    return scale * acc * margin, acc, margin


def np_orm(sims, row_pairs, col_pairs, **kw):
    out = np.array([np_orm_row(sims[i], col_pairs == row_pairs[i], **kw) for i in range(len(sims))])
    return {"orm": out[:, 0], "acc": out[:, 1], "margin": out[:, 2]}


def np_prm_candidates(s, row_pair, col_pairs, k):
    """The official selection: each other pair's best column (strict >: the first maximum), pairs in
    order of first appearance, sorted by that similarity (stable, descending), the first k."""
    best = {}
    for j in range(len(s)):
        p = col_pairs[j]
        if p != row_pair and (p not in best or s[j] > best[p][1]):
            best[p] = (j, s[j])
    ranked = sorted(best.values(), key=lambda js: -js[1])
    return [j for j, _ in ranked[:k]]


# ------------------------------------------------------------------ jitted functions under test
@functools.cache
def _orm_jit(**kw):
    return jax.jit(lambda s, p, c: E.orm_reward(s, p, c, **kw))


def orm(sims, pairs, cols=None, **kw):
    out = _orm_jit(**kw)(np.asarray(sims, np.float32), np.asarray(pairs), np.asarray(pairs if cols is None else cols))
    return jax.tree.map(np.asarray, out)


def check_against_oracle(sims, pairs, cols=None, atol=2e-6, **kw):
    cols = pairs if cols is None else cols
    sims, pairs, cols = np.asarray(sims, np.float32), np.asarray(pairs), np.asarray(cols)
    got = orm(sims, pairs, cols, **kw)
    tr = {"t": kw.get("negative_temperature", 0.5), "scale": kw.get("scale", 0.5)}
    tr.update(top_n=kw.get("top_n", 0), ties=kw.get("ties", "average"))
    want = {"query": np_orm(sims, pairs, cols, **tr), "positive": np_orm(sims.T, cols, pairs, **tr)}
    for side in ("query", "positive"):
        for key in ("orm", "acc", "margin"):
            np.testing.assert_allclose(got[side][key], want[side][key], atol=atol, err_msg=f"{side} {key}")
    return got


# 2 pairs x 2 rollouts: rows/columns are [pair 0 r0, pair 0 r1, pair 1 r0, pair 1 r1]
HAND = np.array([[0.9, 0.5, 0.4, 0.2], [0.3, 0.8, 0.6, 0.1], [0.2, 0.1, 0.7, 0.5], [0.6, 0.0, 0.3, 0.4]], np.float32)
PAIRS = np.array([0, 0, 1, 1])


def test_hand_computed_case():
    # query row 0: own [0.9, 0.5], negatives [0.4, 0.2]; top-2 = {0.9, 0.5} -> acc 1
    #   softmax([0.4, 0.2] / 0.5) = (1 / (1 + e^-0.4), ...) = (0.598688, 0.401312)
    #   neg = 0.4 * 0.598688 + 0.2 * 0.401312 = 0.319738; margin = 0.7 - 0.319738 = 0.380262
    #   ORM = 0.5 * 1 * 0.380262 = 0.190131
    # query row 1: own [0.3, 0.8], negatives [0.6, 0.1]; top-2 = {0.8 own, 0.6 neg} -> acc 0.5
    #   softmax([1.2, 0.2]) = (0.731059, 0.268941); neg = 0.465529; margin = 0.55 - 0.465529 = 0.084471
    #   ORM = 0.5 * 0.5 * 0.084471 = 0.021118
    # positive row 0 (column 0): own [0.9, 0.3], negatives [0.2, 0.6]; top-2 = {0.9 own, 0.6 neg} -> 0.5
    #   softmax([0.4, 1.2]) = (0.310026, 0.689974); neg = 0.475990; margin = 0.6 - 0.475990 = 0.124010
    #   ORM = 0.5 * 0.5 * 0.124010 = 0.031003
    got = check_against_oracle(HAND, PAIRS)
    np.testing.assert_allclose(got["query"]["acc"][:2], [1.0, 0.5])
    np.testing.assert_allclose(got["query"]["margin"][:2], [0.380262, 0.084471], atol=2e-6)
    np.testing.assert_allclose(got["query"]["orm"][:2], [0.190131, 0.021118], atol=2e-6)
    np.testing.assert_allclose(got["positive"]["acc"][0], 0.5)
    np.testing.assert_allclose(got["positive"]["orm"][0], 0.031003, atol=2e-6)


@pytest.mark.parametrize("pairs_g", [(2, 2), (3, 2), (2, 3), (4, 1)], ids=lambda x: f"{x[0]}pairs_G{x[1]}")
def test_random_batches(pairs_g):
    k, g = pairs_g
    rng = np.random.default_rng(k * 10 + g)
    pairs = np.repeat(np.arange(k), g)
    for _ in range(3):
        sims = rng.uniform(-0.2, 1.0, (k * g, k * g))
        check_against_oracle(sims, pairs)
        check_against_oracle(sims, pairs, ties="index", negative_temperature=0.1, scale=1.0)


def test_ties_average_over_every_order_and_index_by_column():
    rng = np.random.default_rng(3)
    for layout in (np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 2, 0, 1, 2]), np.array([1, 0, 0, 2, 1, 2])):
        for _ in range(3):
            sims = rng.choice([0.0, 0.5, 1.0], (6, 6))  # many ties, also across the top-n cut
            check_against_oracle(sims, layout)
            check_against_oracle(sims, layout, ties="index")


def test_unequal_rollout_counts_and_fixed_top_n():
    rng = np.random.default_rng(4)
    rows, cols = np.array([0, 0, 0, 1, 2]), np.array([0, 1, 1, 2, 2, 2])  # Q != P, uneven groups
    sims = rng.choice([0.1, 0.3, 0.9], (5, 6))
    check_against_oracle(sims, rows, cols)
    check_against_oracle(sims, rows, cols, top_n=2)
    check_against_oracle(sims, rows, cols, top_n=2, ties="index")
    check_against_oracle(sims, rows, cols, top_n=50)  # capped at the row length


def test_degenerate_batches():
    # one pair: no negatives -> acc 1, margin = own mean, ORM = 0.5 * mean
    sims = np.array([[0.8, 0.4], [0.2, 0.6]], np.float32)
    got = check_against_oracle(sims, np.array([0, 0]))
    np.testing.assert_allclose(got["query"]["acc"], [1, 1])
    np.testing.assert_allclose(got["query"]["orm"], [0.3, 0.2], atol=1e-7)
    # every rollout identical: margin 0 so ORM 0; "average" gives acc = G / (pairs * G) on every row
    sims = np.full((6, 6), 0.7, np.float32)
    got = check_against_oracle(sims, np.repeat(np.arange(3), 2))
    np.testing.assert_allclose(got["query"]["acc"], 1 / 3, atol=1e-7)
    np.testing.assert_allclose(got["query"]["orm"], 0.0, atol=1e-7)
    got = check_against_oracle(sims, np.repeat(np.arange(3), 2), ties="index")
    np.testing.assert_allclose(got["query"]["acc"], [1, 1, 0, 0, 0, 0])  # column order decides
    # G = 1: the diagonal is the only own entry
    check_against_oracle(np.random.default_rng(5).uniform(0, 1, (3, 3)), np.arange(3))
    # a row whose pair has no column: n = 0 -> acc 0, own mean 0
    got = check_against_oracle(np.array([[0.5, 0.2]]), np.array([7]), np.array([0, 1]))
    assert got["query"]["acc"][0] == 0 and got["query"]["margin"][0] < 0
    assert all(np.isfinite(v).all() for side in got.values() for v in side.values())


def test_prm_reward_and_candidates():
    np.testing.assert_allclose(np.asarray(E.prm_reward([True, False, True], [0.3, 0.4, -0.1])), [0.3, 0.0, -0.1])
    rng = np.random.default_rng(6)
    cand = jax.jit(E.prm_candidates, static_argnames=("num_pairs", "hard_pairs"))
    for pairs in (np.repeat(np.arange(6), 2), np.tile(np.arange(6), 2), np.repeat(np.arange(2), 3)):
        k = int(pairs.max()) + 1
        for sims in (rng.uniform(0, 1, (len(pairs), len(pairs))), rng.choice([0.2, 0.6], (len(pairs), len(pairs)))):
            cols, valid = map(np.asarray, cand(sims.astype(np.float32), pairs, pairs, num_pairs=k, hard_pairs=4))
            for i in range(len(pairs)):
                want = np_prm_candidates(sims[i], pairs[i], pairs, 4)
                assert list(cols[i][valid[i]]) == want, (i, sims[i], pairs)


def np_judge_list(s, row_pair, col_pairs, k):
    """The official candidate list (`candidate_pos_indices`): every own-pair column in index order, then
    the hard pairs' columns; and how many of them are the row's own (`num_positives`)."""
    own = [j for j in range(len(s)) if col_pairs[j] == row_pair]
    return own + np_prm_candidates(s, row_pair, col_pairs, k), len(own)


def np_verdict(choice, num_own, num_listed):
    """The official check: `0 <= selected_idx < num_positives` (a -1 or out-of-range pick is wrong)."""
    return 0 <= choice < num_own and choice < num_listed


def test_judge_candidates_against_the_official_lists():
    rng = np.random.default_rng(8)
    fn = jax.jit(E.judge_candidates, static_argnames=("num_pairs", "hard_pairs", "num_own"))
    for I, G, k in ((2, 3, 4), (6, 2, 4), (4, 2, 2), (1, 3, 4)):
        pairs = np.repeat(np.arange(I), G)
        for sims in (rng.uniform(-1, 1, (I * G, I * G)), rng.choice([0.1, 0.5], (I * G, I * G))):
            cols, own, valid = map(
                np.asarray, fn(sims.astype(np.float32), pairs, pairs, num_pairs=I, hard_pairs=k, num_own=G)
            )
            assert cols.shape == (I * G, G + min(k, I))
            for i in range(I * G):
                want, n_own = np_judge_list(sims[i], pairs[i], pairs, k)
                assert list(cols[i][valid[i]]) == want, (I, G, i)
                assert list(own[i][valid[i]]) == [True] * n_own + [False] * (len(want) - n_own)
                assert not own[i][~valid[i]].any()
    # hand-checked: 3 pairs x 2 rollouts, row 0 (pair 0): own columns 0, 1; pair 2's best column 5 (0.7)
    # beats pair 1's best column 2 (0.6), so the list is [0, 1, 5, 2]; with hard_pairs 1 only [0, 1, 5]
    row = np.array([[0.1, 0.2, 0.6, 0.3, 0.5, 0.7]], np.float32)
    c, o, v = E.judge_candidates(row, np.array([0]), np.repeat(np.arange(3), 2), num_pairs=3, hard_pairs=4, num_own=2)
    assert np.asarray(c)[0][np.asarray(v)[0]].tolist() == [0, 1, 5, 2]
    # K = min(hard_pairs, num_pairs) = 3 slots, of which only 2 other pairs exist: the last is padding
    assert np.asarray(o)[0].tolist() == [True, True, False, False, False]
    assert np.asarray(v)[0].tolist() == [True] * 4 + [False]
    c, _, _ = E.judge_candidates(row, np.array([0]), np.repeat(np.arange(3), 2), num_pairs=3, hard_pairs=1, num_own=2)
    assert np.asarray(c)[0].tolist() == [0, 1, 5]


def test_judge_verdicts_and_prm():
    own = np.array([[True, True, False, False]] * 6 + [[True, False, False, False]])
    choice = np.array([0, 1, 2, 3, -1, 4, 1])
    got = np.asarray(jax.jit(E.judge_verdicts)(choice, own))
    assert got.tolist() == [True, True, False, False, False, False, False]
    assert got.tolist() == [np_verdict(c, int(o.sum()), 4) for c, o in zip(choice, own)]
    # a shuffled list: the own rollouts anywhere
    assert np.asarray(
        E.judge_verdicts(np.array([2, 0]), np.array([[False, False, True], [False, True, False]]))
    ).tolist() == [True, False]
    margin = np.array([0.3, -0.2, 0.5, 0.1, 0.4, 0.2, 0.6])
    np.testing.assert_allclose(np.asarray(E.prm_reward(got, margin)), [0.3, -0.2, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "text, k, strict, official",
    [
        ("1", 4, 0, 0),
        (" 3\n", 4, 2, 2),
        ("4", 4, 3, 3),
        ("5", 4, -1, -1),  # out of range: wrong for both
        ("0", 4, -1, -1),
        ("Candidate 2", 4, -1, 1),  # official: the first run of digits
        ("2.", 4, -1, 1),
        ("2 or 3", 4, -1, 1),
        ("12", 4, -1, -1),
        ("", 4, -1, -1),
        ("two", 4, -1, -1),
        ("\u0663", 4, -1, 2),  # an Arabic-Indic 3: not ASCII (strict); Python's \d and int() accept it
        (None, 4, -1, -1),
    ],
)
def test_parse_judge_choice(text, k, strict, official):
    assert E.parse_judge_choice(text, k) == strict
    assert E.parse_judge_choice(text, k, "first_integer") == official


def test_parse_judge_choice_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="parse"):
        E.parse_judge_choice("1", 2, "loose")


def test_weights_and_total():
    fmt, orm_, prm = np.array([1.0, 0.0]), np.array([0.2, -0.1]), np.array([0.3, 0.0])
    on = EmbedRLRewardConfig(prm_enabled=True)
    np.testing.assert_allclose(E.total_reward(fmt, orm_, prm, on), [0.05 + 0.16 + 0.06, -0.08], atol=1e-7)
    keep = EmbedRLRewardConfig()  # judge off (default): PRM's term vanishes, as in the official code
    assert E.reward_weights(keep) == (0.05, 0.8, 0.0)
    np.testing.assert_allclose(E.total_reward(fmt, orm_, None, keep), [0.05 + 0.16, -0.08], atol=1e-7)
    ren = EmbedRLRewardConfig(prm_off_weights="renormalise")
    wf, wo, wp = E.reward_weights(ren)
    assert math.isclose(wf + wo, 1.05) and math.isclose(wf / wo, 0.05 / 0.8) and wp == 0
    with pytest.raises(ValueError, match="needs the PRM"):
        E.total_reward(fmt, orm_, None, on)
    for bad in ({"ties": "random"}, {"negative_temperature": 0.0}, {"top_n": -1}, {"orm_weight": -1.0}):
        with pytest.raises(ValueError):
            EmbedRLRewardConfig(**bad)
    np.testing.assert_array_equal(np.asarray(E.format_reward(np.array([1, 0], bool))), [1.0, 0.0])
    assert E.format_reward([True]).dtype == np.float32


def test_batch_rewards_against_the_official_totals():
    """R per rollout as the official compute_rewards adds it up: 0.05 format + 0.8 ORM + 0.2 PRM."""
    rng = np.random.default_rng(7)
    pairs = np.repeat(np.arange(3), 2)
    sims = rng.uniform(0, 1, (6, 6)).astype(np.float32)
    fq, fp = rng.integers(0, 2, 6).astype(bool), rng.integers(0, 2, 6).astype(bool)
    jq, jp = rng.integers(0, 2, 6).astype(bool), rng.integers(0, 2, 6).astype(bool)
    cfg = EmbedRLRewardConfig(prm_enabled=True)
    got = jax.jit(lambda *a: E.batch_rewards(a[0], a[1], a[2], a[3], cfg, a[4], a[5]))(sims, pairs, fq, fp, jq, jp)
    for side, s, f, j in (("query", sims, fq, jq), ("positive", sims.T, fp, jp)):
        o = np_orm(s, pairs, pairs, t=0.5, scale=0.5, top_n=0, ties="index")
        want = 0.05 * f + 0.8 * o["orm"] + 0.2 * np.where(j, o["margin"], 0.0)
        np.testing.assert_allclose(np.asarray(got[side]["total"]), want, atol=2e-6)
    off = E.batch_rewards(sims, pairs, fq, fp, EmbedRLRewardConfig())
    np.testing.assert_array_equal(np.asarray(off["query"]["prm"]), 0.0)
    with pytest.raises(ValueError, match="judge"):
        E.batch_rewards(sims, pairs, fq, fp, cfg)


def test_sharded_over_a_2x2x2_mesh_matches_one_device_and_the_oracle():
    r = run_check(os.path.join(os.path.dirname(__file__), "embed_rl_mesh_check.py"), timeout=600)
    assert r["devices"] == 8 and r["mesh"] == [2, 2, 2]
    sims, pairs = np.asarray(r["sims"]), np.asarray(r["pairs"])
    for side in ("query", "positive"):
        for key in ("orm", "acc", "margin"):
            np.testing.assert_allclose(r["sharded"][side][key], r["single"][side][key], atol=1e-6)
    np.testing.assert_array_equal(r["sharded_candidates"], r["single_candidates"])
    np.testing.assert_allclose(r["sharded_total"], r["single_total"], atol=1e-6)
    want = np_orm(sims, pairs, pairs, t=0.5, scale=0.5, top_n=0, ties="index")  # untied: equal to "average"
    np.testing.assert_allclose(r["sharded"]["query"]["orm"], want["orm"], atol=2e-6)
