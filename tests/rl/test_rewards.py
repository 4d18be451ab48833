"""Rewards vs independent oracles: a stable-sort rank reference, hand arithmetic, float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elva_jax.rl import rewards as R
from elva_jax.rl.rewards import DEFAULT_DELTA, DEFAULT_GAMMA, RewardConfig


def _jitted(fn):
    """``fn(sims, valid=None, **hyper)`` under ``jax.jit`` with hyperparameters baked in as constants.

    Eager first calls compile op by op and are ~10x slower than one jit; ``test_eager_matches_jit``
    covers the eager path.
    """
    cache = {}

    def call(sims, valid=None, **kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = jax.jit(lambda s, v: fn(s, valid=v, **kw))
        return cache[key](sims, valid)

    return call


ranks = _jitted(R.ranks)
ranking_reward = _jitted(R.ranking_reward)
margin_reward = _jitted(R.margin_reward)
soft_ranks = _jitted(R.soft_ranks)
soft_ranking_reward = _jitted(R.soft_ranking_reward)
total_reward = _jitted(R.total_reward)
reward_from_config = _jitted(lambda s, valid=None, cfg=None: R.reward_from_config(s, cfg, valid))
soft_ranking_loss = _jitted(lambda s, valid=None, cfg=None: R.soft_ranking_loss(s, cfg, valid))

LN = math.log


# ------------------------------------------------------------------ numpy oracles (float64, loops)
def np_ranks_row(s, valid):
    """1-based positions in a stable descending sort restricted to valid entries; 0 for padding."""
    valid = np.asarray(valid, bool).copy()
    valid[0] = True
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(-s[idx], kind="stable")]
    out = np.zeros(s.shape[-1], np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def np_ranks(s, valid):
    s = np.asarray(s, np.float64)
    valid = np.broadcast_to(np.asarray(valid, bool), s.shape)
    flat_s, flat_v = s.reshape(-1, s.shape[-1]), valid.reshape(-1, s.shape[-1])
    return np.stack([np_ranks_row(a, b) for a, b in zip(flat_s, flat_v)]).reshape(s.shape)


def np_ranking_from_ranks_row(s, r, valid, gamma, base):
    out = s[0] / (1 + math.log(r[0], base))
    for k in range(1, len(s)):
        if valid[k]:
            out -= gamma * s[k] * (math.log(r[k], base) - 1)
    return out


def np_soft_ranks_row(s, valid, t):
    valid = np.asarray(valid, bool).copy()
    valid[0] = True
    out = np.zeros(len(s))
    for i in range(len(s)):
        if valid[i]:
            out[i] = 1 + sum(1 / (1 + math.exp(-(s[j] - s[i]) / t)) for j in range(len(s)) if j != i and valid[j])
    return out


def np_reward_rows(s, valid, fn):
    s = np.asarray(s, np.float64)
    valid = np.broadcast_to(np.asarray(valid, bool), s.shape).copy()
    valid[..., 0] = True
    flat_s, flat_v = s.reshape(-1, s.shape[-1]), valid.reshape(-1, s.shape[-1])
    return np.array([fn(a, b) for a, b in zip(flat_s, flat_v)]).reshape(s.shape[:-1])


def tied_sims(rng, shape):
    """Values on a coarse grid so ties are frequent."""
    return np.round(rng.uniform(-1, 1, size=shape), 1).astype(np.float32)


def random_valid(rng, shape, p=0.7):
    v = rng.uniform(size=shape) < p
    v[..., 0] = True
    return v


SHAPES = [(7,), (5, 9), (3, 4, 11)]


# ------------------------------------------------------------------ hard ranks
@pytest.mark.parametrize("shape", SHAPES)
def test_ranks_match_stable_sort(shape):
    fn = ranks
    rng = np.random.default_rng(0)
    for _ in range(15):
        s = tied_sims(rng, shape)
        v = random_valid(rng, shape)
        got = np.asarray(fn(s, v))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np_ranks(s, v))
        # without a mask: every entry valid
        np.testing.assert_array_equal(np.asarray(fn(s)), np_ranks(s, np.ones(shape, bool)))


def test_eager_matches_jit():
    rng = np.random.default_rng(10)
    s, v = tied_sims(rng, (4, 6)), random_valid(rng, (4, 6))
    np.testing.assert_array_equal(R.ranks(s, v), np_ranks(s, v))
    tot, _ = R.total_reward(s, gamma=0.1, delta=0.05, valid=v)
    np.testing.assert_allclose(tot, total_reward(s, v, gamma=0.1, delta=0.05)[0], rtol=1e-6)


def test_ranks_are_permutation_and_padding_is_zero():
    rng = np.random.default_rng(1)
    s = tied_sims(rng, (50, 13))
    v = random_valid(rng, (50, 13), p=0.5)
    r = np.asarray(ranks(s, v))
    assert np.all(r[~v] == 0)
    for row, vrow in zip(r, v):
        np.testing.assert_array_equal(np.sort(row[vrow]), np.arange(1, vrow.sum() + 1))


def test_ranks_explicit_ties_and_forced_positive():
    # ties broken by index: the earlier candidate ranks higher
    np.testing.assert_array_equal(ranks(jnp.array([0.5, 0.5, 0.7, 0.5, 0.1])), [2, 3, 1, 4, 5])
    # valid[0] is forced True; a padded 0.9 does not push anybody down
    r = ranks(jnp.array([0.5, 0.9, 0.7]), jnp.array([False, False, True]))
    np.testing.assert_array_equal(r, [2, 0, 1])
    np.testing.assert_array_equal(ranks(jnp.array([0.3])), [1])


def test_ranks_bfloat16_input_same_as_float32():
    rng = np.random.default_rng(2)
    s = jnp.asarray(tied_sims(rng, (8, 10)), jnp.bfloat16)
    np.testing.assert_array_equal(ranks(s), np_ranks(np.asarray(s.astype(jnp.float32)), np.ones((8, 10))))


# ------------------------------------------------------------------ hard ranking reward, by hand
def test_ranking_reward_hand_no_ties_natural_log():
    # order: 0.9 (idx 2) -> 1, pos 0.8 -> 2, 0.5 -> 3, 0.1 -> 4
    g = 0.1
    expected = 0.8 / (1 + LN(2)) - g * (0.5 * (LN(3) - 1) + 0.9 * (LN(1) - 1) + 0.1 * (LN(4) - 1))
    got = ranking_reward(jnp.array([0.8, 0.5, 0.9, 0.1]), gamma=g)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ranking_reward_hand_log_base_2():
    g = 0.1
    # log2(2) = 1, log2(1) = 0, log2(4) = 2
    expected = 0.8 / (1 + 1) - g * (0.5 * (math.log2(3) - 1) + 0.9 * (0 - 1) + 0.1 * (2 - 1))
    got = ranking_reward(jnp.array([0.8, 0.5, 0.9, 0.1]), gamma=g, log_base=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    base_e = ranking_reward(jnp.array([0.8, 0.5, 0.9, 0.1]), gamma=g)
    assert abs(float(got) - float(base_e)) > 1e-3


def test_ranking_reward_hand_tie_with_positive():
    # pos 0.5 ties negative idx 1; index breaks the tie: 0.7 -> 1, pos -> 2, idx 1 -> 3
    g = 0.2
    expected = 0.5 / (1 + LN(2)) - g * (0.5 * (LN(3) - 1) + 0.7 * (LN(1) - 1))
    np.testing.assert_allclose(ranking_reward(jnp.array([0.5, 0.5, 0.7]), gamma=g), expected, rtol=1e-6)


def test_ranking_reward_hand_padding():
    # idx 1 (0.9) is padding: valid order 0.7 -> 1, pos 0.6 -> 2, 0.2 -> 3
    g = 0.1
    expected = 0.6 / (1 + LN(2)) - g * (0.7 * (LN(1) - 1) + 0.2 * (LN(3) - 1))
    s = jnp.array([0.6, 0.9, 0.7, 0.2])
    v = jnp.array([True, False, True, True])
    np.testing.assert_allclose(ranking_reward(s, gamma=g, valid=v), expected, rtol=1e-6)
    np.testing.assert_allclose(ranking_reward(jnp.array([0.6, 0.7, 0.2]), gamma=g), expected, rtol=1e-6)


def test_ranking_reward_top_positive_no_negatives():
    np.testing.assert_allclose(ranking_reward(jnp.array([0.42]), gamma=0.3), 0.42, rtol=1e-6)


@pytest.mark.parametrize("base", [math.e, 2.0, 10.0])
def test_ranking_reward_batched_vs_numpy(base):
    rng = np.random.default_rng(3)
    shape = (3, 4, 12)
    s, v = tied_sims(rng, shape), random_valid(rng, shape)
    g = 0.05
    exp = np_reward_rows(s, v, lambda a, b: np_ranking_from_ranks_row(a, np_ranks_row(a, b), b, g, base))
    got = ranking_reward(s, v, gamma=g, log_base=base)
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_ranking_reward_traced_hyperparameters():
    s = jnp.array([0.8, 0.5, 0.9, 0.1])
    f = jax.jit(lambda s, g, b: R.ranking_reward(s, gamma=g, log_base=b))
    np.testing.assert_allclose(f(s, 0.1, 2.0), ranking_reward(s, gamma=0.1, log_base=2.0), rtol=1e-6)


def test_invalid_log_base_and_temperature_rejected():
    with pytest.raises(ValueError, match="log_base"):
        R.ranking_reward(jnp.array([0.1, 0.2]), gamma=0.1, log_base=1.0)
    with pytest.raises(ValueError, match="temperature"):
        R.soft_ranks(jnp.array([0.1, 0.2]), temperature=0.0)


# ------------------------------------------------------------------ margin / total, by hand
def test_margin_reward_hand():
    d = 0.05
    cases = [
        ([0.8, 0.5, 0.9, 0.1], None, max(0.0, 0.8 - 0.9 - d)),  # hardest negative above: 0
        ([0.8, 0.5, 0.3], None, 0.8 - 0.5 - d),
        ([0.8, 0.95, 0.3], [True, False, True], 0.8 - 0.3 - d),  # padded 0.95 ignored
        ([0.8, 0.95], [True, False], 0.8 - d),  # no valid negative: hardest taken as 0
        ([0.8], None, 0.8 - d),
        ([-0.3], None, 0.0),
        ([0.5, 0.45], None, 0.0),  # gap exactly delta -> 0
    ]
    for s, v, exp in cases:
        got = margin_reward(jnp.array(s), delta=d, valid=None if v is None else jnp.array(v))
        np.testing.assert_allclose(got, exp, atol=1e-6, err_msg=str((s, v)))


def test_margin_reward_batched_and_grad():
    rng = np.random.default_rng(4)
    s, v = tied_sims(rng, (6, 5, 8)), random_valid(rng, (6, 5, 8), p=0.4)
    v[0, 0, 1:] = False  # a row with no negative at all

    def ref(a, b):
        negs = [a[k] for k in range(1, len(a)) if b[k]]
        return max(0.0, a[0] - (max(negs) if negs else 0.0) - 0.05)

    np.testing.assert_allclose(margin_reward(s, delta=0.05, valid=v), np_reward_rows(s, v, ref), atol=1e-6)
    grad = jax.jit(jax.grad(lambda x: R.margin_reward(x, delta=0.05, valid=v).sum()))(jnp.asarray(s))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~v] == 0)


def test_total_reward_hand():
    s = jnp.array([0.8, 0.5, 0.3])  # pos rank 1, negs rank 2, 3
    g, d = 0.1, 0.05
    rank_r = 0.8 / (1 + LN(1)) - g * (0.5 * (LN(2) - 1) + 0.3 * (LN(3) - 1))
    marg = 0.8 - 0.5 - d
    tot, parts = total_reward(s, gamma=g, delta=d)
    np.testing.assert_allclose(parts["ranking"], rank_r, rtol=1e-6)
    np.testing.assert_allclose(parts["margin"], marg, rtol=1e-6)
    np.testing.assert_allclose(tot, 0.4 * marg + 0.6 * rank_r, rtol=1e-6)
    tot2, _ = total_reward(s, alpha=0.5, epsilon=0.5, gamma=g, delta=d)
    np.testing.assert_allclose(tot2, 0.5 * marg + 0.5 * rank_r, rtol=1e-6)


def test_reward_config_defaults_and_from_config():
    cfg = RewardConfig()
    assert (cfg.alpha, cfg.epsilon, cfg.log_base) == (0.4, 0.6, math.e)
    assert (cfg.gamma, cfg.delta) == (DEFAULT_GAMMA, DEFAULT_DELTA)
    s = jnp.array([[0.8, 0.5, 0.3], [0.2, 0.6, 0.1]])
    g, d = cfg.gamma, cfg.delta
    row0 = 0.4 * (0.8 - 0.5 - d) + 0.6 * (0.8 - g * (0.5 * (LN(2) - 1) + 0.3 * (LN(3) - 1)))
    row1 = 0.4 * 0.0 + 0.6 * (0.2 / (1 + LN(2)) - g * (0.6 * (LN(1) - 1) + 0.1 * (LN(3) - 1)))
    tot, _ = reward_from_config(s, cfg=cfg)
    np.testing.assert_allclose(tot, [row0, row1], rtol=1e-6)
    with pytest.raises(ValueError):
        RewardConfig(log_base=1.0)
    with pytest.raises(ValueError):
        RewardConfig(soft_temperature=0.0)
    with pytest.raises(ValueError):
        RewardConfig(gamma=-1.0)


# ------------------------------------------------------------------ soft ranks / soft reward
def distinct_sims(rng, shape, gap=1e-2):
    """Rows of distinct values: a shuffled grid with spacing >= gap."""
    c = shape[-1]
    base = np.arange(c) * gap - 0.5
    rows = [rng.permutation(base) for _ in range(int(np.prod(shape[:-1], dtype=int)))]
    return np.asarray(rows, np.float32).reshape(shape)


def test_soft_ranks_vs_numpy():
    rng = np.random.default_rng(5)
    s, v = rng.uniform(-1, 1, (4, 9)).astype(np.float32), random_valid(rng, (4, 9))
    exp = np.stack([np_soft_ranks_row(a.astype(np.float64), b, 0.2) for a, b in zip(s, v)])
    np.testing.assert_allclose(soft_ranks(s, temperature=0.2, valid=v), exp, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_soft_ranks_tend_to_hard_without_ties(shape):
    rng = np.random.default_rng(6)
    s, v = distinct_sims(rng, shape), random_valid(rng, shape)
    hard = np_ranks(s, v).astype(np.float64)
    errs = [float(np.max(np.abs(soft_ranks(s, temperature=t, valid=v) - hard))) for t in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert all(a >= b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6
    hard_r = np_reward_rows(s, v, lambda a, b: np_ranking_from_ranks_row(a, np_ranks_row(a, b), b, 0.05, math.e))
    soft_r = soft_ranking_reward(s, gamma=0.05, temperature=1e-4, valid=v)
    np.testing.assert_allclose(soft_r, hard_r, atol=1e-5)


def test_soft_ranks_ties_tend_to_average_position():
    # 0.7 -> 1; three 0.5's share positions 2, 3, 4 -> 3 each; 0.1 -> 5
    s = jnp.array([0.5, 0.5, 0.7, 0.5, 0.1])
    np.testing.assert_allclose(soft_ranks(s, temperature=1e-4), [3, 3, 1, 3, 5], atol=1e-6)
    g = 0.1
    exp = 0.5 / (1 + LN(3)) - g * (0.5 * (LN(3) - 1) + 0.7 * (LN(1) - 1) + 0.5 * (LN(3) - 1) + 0.1 * (LN(5) - 1))
    np.testing.assert_allclose(soft_ranking_reward(s, gamma=g, temperature=1e-4), exp, rtol=1e-5)
    # the hard reward breaks the same tie by index instead: pos -> 2
    exp_hard = 0.5 / (1 + LN(2)) - g * (0.5 * (LN(3) - 1) + 0.7 * (LN(1) - 1) + 0.5 * (LN(4) - 1) + 0.1 * (LN(5) - 1))
    np.testing.assert_allclose(ranking_reward(s, gamma=g), exp_hard, rtol=1e-5)


def test_soft_ranks_padding_ignored():
    s = jnp.array([0.6, 0.99, 0.7, 0.2])
    v = jnp.array([True, False, True, True])
    np.testing.assert_allclose(soft_ranks(s, temperature=1e-4, valid=v), [2, 0, 1, 3], atol=1e-6)


def np_soft_reward_row(s, valid, gamma, t, base=math.e):
    return np_ranking_from_ranks_row(s, np_soft_ranks_row(s, valid, t), valid, gamma, base)


@pytest.mark.parametrize(
    "sims,valid",
    [
        ([0.3, 0.1, 0.5, -0.2, 0.4], None),
        ([0.5, 0.5, 0.7, 0.5, 0.1], None),  # ties
        ([0.6, 0.99, 0.7, 0.2, 0.6], [True, False, True, True, True]),  # padding + tie
    ],
)
def test_soft_reward_gradient_matches_finite_differences(sims, valid):
    s = np.asarray(sims, np.float64)
    v = np.ones(len(s), bool) if valid is None else np.asarray(valid)
    g, t, base = 0.1, 0.1, 2.0
    grad = np.asarray(
        jax.grad(lambda x: soft_ranking_reward(x, gamma=g, temperature=t, log_base=base, valid=v))(
            jnp.asarray(s, jnp.float32)
        )
    )
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    h = 1e-5
    fd = np.zeros_like(s)
    for i in range(len(s)):
        e = np.zeros_like(s)
        e[i] = h
        fd[i] = (np_soft_reward_row(s + e, v, g, t, base) - np_soft_reward_row(s - e, v, g, t, base)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-4)
    assert np.all(grad[~v] == 0)


def test_soft_reward_gradient_finite_at_small_temperature_batched():
    rng = np.random.default_rng(7)
    s, v = tied_sims(rng, (3, 4, 10)), random_valid(rng, (3, 4, 10))
    for t in (1e-1, 1e-3, 1e-6):
        grad = jax.jit(jax.grad(lambda x, t=t: soft_ranking_reward(x, gamma=0.05, temperature=t, valid=v).sum()))(s)
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), t
        assert np.all(grad[~v] == 0)


def test_soft_ranking_loss():
    cfg = RewardConfig(gamma=0.1, soft_temperature=0.1)
    rng = np.random.default_rng(8)
    s, v = rng.uniform(-1, 1, (2, 3, 6)).astype(np.float32), random_valid(rng, (2, 3, 6))
    exp = -np.mean(np_reward_rows(s, v, lambda a, b: np_soft_reward_row(a, b, 0.1, 0.1)))
    loss = soft_ranking_loss(s, v, cfg=cfg)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, exp, rtol=1e-5)
    grad = jax.grad(lambda x: soft_ranking_loss(x, v, cfg=cfg))(jnp.asarray(s))
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)
