"""GRPO pieces vs a plain float64 python-loop reference of the formulas (values and gradients)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elva_jax.rl import grpo as G
from elva_jax.rl.grpo import aggregate, group_advantages, grpo_token_loss, kl_estimate


@functools.cache
def _compiled(kw_items):
    kw = dict(kw_items)
    f = lambda lp, old, ref, adv, m: G.grpo_loss(lp, old, ref, adv, m, **kw)
    return jax.jit(f), jax.jit(jax.value_and_grad(f, has_aux=True))


def grpo_loss(lp, old, ref, adv, m, **kw):
    """``G.grpo_loss`` under jit (eager first calls compile op by op, ~10x slower)."""
    return _compiled(tuple(sorted(kw.items())))[0](lp, old, ref, adv, m)


def grpo_loss_and_grad(lp, old, ref, adv, m, **kw):
    """``((loss, metrics), d loss / d lp)`` under jit."""
    return _compiled(tuple(sorted(kw.items())))[1](lp, old, ref, adv, m)


MODES = ["grpo", "bnpo", "dapo", "dr_grpo"]
ESTIMATORS = ["k1", "k2", "k3"]


# ------------------------------------------------------------------ python-loop reference
def ref_kl(lp, rf, est):
    d = rf - lp
    return {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[est]


def ref_dkl(lp, rf, est):
    """d KL / d logp."""
    d = rf - lp
    return {"k1": 1.0, "k2": -d, "k3": 1.0 - math.exp(d)}[est]


def ref_loss_and_grad(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, est, mode, max_len=None):
    """Returns (loss, dloss/dlogp [B, T], loss_sum, denominator) by explicit loops."""
    B, T = logp.shape
    tok = np.zeros((B, T))
    dtok = np.zeros((B, T))
    for b in range(B):
        A = float(adv[b])
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            if r * A <= c * A:  # unclipped branch is the min
                pg, dpg = -r * A, -r * A
            else:  # clipped branch wins: ratio outside the range, constant in logp
                pg, dpg = -c * A, 0.0
            tok[b, t] = pg + beta * ref_kl(logp[b, t], ref[b, t], est)
            dtok[b, t] = dpg + beta * ref_dkl(logp[b, t], ref[b, t], est)
    n_b = mask.sum(1)
    S = int((n_b > 0).sum())
    L = T if max_len is None else max_len
    w = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                if mode == "grpo":
                    w[b, t] = 1.0 / n_b[b]
                else:
                    w[b, t] = 1.0
    total = float((w * tok).sum())
    denom = {"grpo": S, "bnpo": mask.sum(), "dapo": mask.sum(), "dr_grpo": S * L}[mode]
    return total / denom, w * dtok / denom, total, float(denom)


def make_batch(seed, B=6, T=9, empty_row=True, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    old = logp + rng.normal(0, spread, (B, T))
    ref = logp + rng.normal(0, spread, (B, T))
    adv = rng.normal(0, 1, B)
    adv[1] = 0.0
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    if empty_row:
        mask[-1] = False  # an all-padding row (static-shape bucketing)
    return logp, old, ref, adv, mask


def to32(*xs):
    return [jnp.asarray(x, jnp.float32) if x.dtype != bool else jnp.asarray(x) for x in xs]


HP = dict(eps_low=0.2, eps_high=0.28, beta=0.2)


# ------------------------------------------------------------------ loss + gradient vs reference
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_grpo_loss_and_grad_vs_reference(mode, est):
    logp, old, ref, adv, mask = make_batch(0)
    max_len = 12 if mode == "dr_grpo" else None  # dr_grpo: explicit L != T
    exp_loss, exp_grad, exp_sum, exp_den = ref_loss_and_grad(
        logp, old, ref, adv, mask, est=est, mode=mode, max_len=max_len, **HP
    )
    kw = dict(HP, kl_estimator=est, loss_type=mode, max_completion_length=max_len)
    lp, o, r, a, m = to32(logp, old, ref, adv, mask)
    (loss, metrics), grad = grpo_loss_and_grad(lp, o, r, a, m, **kw)
    np.testing.assert_allclose(loss, exp_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss_sum"], exp_sum, rtol=2e-5, atol=1e-6)
    assert float(metrics["denominator"]) == exp_den
    np.testing.assert_allclose(grad, exp_grad, rtol=2e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[~mask] == 0)
    if (mode, est) == ("grpo", "k3"):  # eager (un-jitted) gives the same
        (loss_e, _), grad_e = jax.value_and_grad(G.grpo_loss, has_aux=True)(lp, o, r, a, m, **kw)
        np.testing.assert_allclose(loss_e, loss, rtol=1e-6)
        np.testing.assert_allclose(grad_e, grad, rtol=1e-6, atol=1e-9)


def test_clipping_actually_exercised_and_stats():
    logp, old, ref, adv, mask = make_batch(1, B=8, T=16, spread=0.5)
    per_tok, stats = grpo_token_loss(*to32(logp, old, ref, adv, mask), **HP, kl_estimator="k3")
    ratio = np.exp(logp - old)
    A = np.broadcast_to(adv[:, None], logp.shape)
    n = mask.sum()
    low = (mask & (ratio < 1 - HP["eps_low"]) & (A < 0)).sum() / n
    high = (mask & (ratio > 1 + HP["eps_high"]) & (A > 0)).sum() / n
    assert low > 0 and high > 0  # the test data does hit both clip sides
    np.testing.assert_allclose(stats["clip_low"], low, rtol=1e-6)
    np.testing.assert_allclose(stats["clip_high"], high, rtol=1e-6)
    np.testing.assert_allclose(stats["clip"], low + high, rtol=1e-6)
    kl = np.array([[ref_kl(logp[b, t], ref[b, t], "k3") for t in range(16)] for b in range(8)])
    np.testing.assert_allclose(stats["kl_mean"], kl[mask].mean(), rtol=1e-5)
    assert float(stats["num_tokens"]) == n
    assert np.all(np.asarray(per_tok)[~mask] == 0)


def test_token_advantages_per_token_shape_accepted():
    logp, old, ref, adv, mask = make_batch(2)
    a_tok = np.broadcast_to(adv[:, None], logp.shape)
    l1, _ = grpo_token_loss(*to32(logp, old, ref, adv, mask), **HP, kl_estimator="k1")
    l2, _ = grpo_token_loss(*to32(logp, old, ref, a_tok, mask), **HP, kl_estimator="k1")
    np.testing.assert_allclose(l1, l2, rtol=1e-6)


# ------------------------------------------------------------------ ratio == 1
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_on_policy_loss_is_beta_kl_but_gradient_is_not_zero(mode, est):
    logp, _, ref, adv, mask = make_batch(3)
    beta = 0.2
    lp, r, a, m = to32(logp, ref, adv, mask)
    kl = np.array([[ref_kl(logp[b, t], ref[b, t], est) for t in range(logp.shape[1])] for b in range(len(logp))])
    n_b = mask.sum(1)
    rows = n_b > 0
    exp_kl = {
        "grpo": np.mean([(kl[b] * mask[b]).sum() / n_b[b] for b in np.flatnonzero(rows)]),
        "bnpo": kl[mask].mean(),
        "dapo": kl[mask].mean(),
        "dr_grpo": kl[mask].sum() / (rows.sum() * logp.shape[1]),
    }[mode]
    # the policy-gradient term: -A * ratio = -A, summed over sequences, is sum_b -A_b * (weight)
    exp_pg = {
        "grpo": -adv[rows].sum() / rows.sum(),
        "bnpo": -(adv[:, None] * mask).sum() / mask.sum(),
        "dapo": -(adv[:, None] * mask).sum() / mask.sum(),
        "dr_grpo": -(adv[:, None] * mask).sum() / (rows.sum() * logp.shape[1]),
    }[mode]
    kw = dict(eps_low=0.2, eps_high=0.2, beta=beta, kl_estimator=est, loss_type=mode)
    for old in (jnp.asarray(logp, jnp.float32), None):  # explicit copy of logp, or on-policy None
        (loss, metrics), grad = grpo_loss_and_grad(lp, old, r, a, m, **kw)
        assert float(metrics["clip"]) == 0.0
        # ratio == 1 -> the surrogate equals -A, which is what the loss adds to beta * KL
        np.testing.assert_allclose(loss, beta * exp_kl + exp_pg, rtol=2e-5, atol=1e-6)
        _, exp_grad, _, _ = ref_loss_and_grad(
            logp, logp, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=beta, est=est, mode=mode
        )
        np.testing.assert_allclose(grad, exp_grad, rtol=2e-4, atol=1e-6)
        assert np.abs(np.asarray(grad)).max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_on_policy_zero_advantage_loss_is_exactly_beta_kl_grad_nonzero(mode):
    logp, _, ref, _, mask = make_batch(4)
    adv = np.zeros(len(logp))
    lp, r, a, m = to32(logp, ref, adv, mask)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.2, kl_estimator="k3", loss_type=mode)
    (loss, _), grad = grpo_loss_and_grad(lp, lp, r, a, m, **kw)
    kl = np.array([[ref_kl(logp[b, t], ref[b, t], "k3") for t in range(logp.shape[1])] for b in range(len(logp))])
    kl_sum, kl_den = aggregate(jnp.asarray(kl, jnp.float32), m, mode)
    np.testing.assert_allclose(loss, 0.2 * kl_sum / kl_den, rtol=1e-5)
    assert np.abs(np.asarray(grad)).max() > 1e-3  # the KL still pulls towards the reference


# ------------------------------------------------------------------ KL estimators
def test_kl_estimators_values():
    rng = np.random.default_rng(5)
    logp = rng.normal(-2, 1, 200)
    ref = logp + rng.normal(0, 2, 200)
    for est in ESTIMATORS:
        exp = np.array([ref_kl(a, b, est) for a, b in zip(logp, ref)])
        np.testing.assert_allclose(kl_estimate(logp, ref, est), exp, rtol=1e-5, atol=1e-6)


def test_k3_never_negative():
    d = np.concatenate(
        [
            -np.logspace(-12, 3, 200),
            np.logspace(-12, 3, 200),
            [0.0, 1e-30, -1e-30],
            np.linspace(-50, 50, 1001),
        ]
    ).astype(np.float32)
    logp = np.full_like(d, -3.0)
    for lp, rf in ((logp, logp + d), (logp - d, logp)):
        k3 = np.asarray(kl_estimate(lp, rf, "k3"))
        assert not np.any(np.isnan(k3))
        assert np.all(k3 >= 0)
    # large negative d: exp(d) - d - 1 ~ |d| - 1 (no cancellation blow-up)
    np.testing.assert_allclose(kl_estimate(jnp.float32(500.0), jnp.float32(0.0), "k3"), 499.0, rtol=1e-6)
    # small d: ~ d^2 / 2 with relative accuracy thanks to expm1
    np.testing.assert_allclose(kl_estimate(jnp.float32(0.0), jnp.float32(1e-3), "k3"), 1e-6 / 2 + 1e-9 / 6, rtol=2e-3)


def test_bad_choices_name_the_closest():
    with pytest.raises(ValueError, match="did you mean 'k3'"):
        kl_estimate(jnp.zeros(2), jnp.zeros(2), "kl3")
    with pytest.raises(ValueError, match="did you mean 'dr_grpo'"):
        aggregate(jnp.zeros((2, 2)), jnp.ones((2, 2)), "drgrpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(jnp.zeros((1, 2)), None, None, jnp.ones(1), jnp.ones((1, 2)), **HP, kl_estimator="k3")
    with pytest.raises(ValueError):
        group_advantages(jnp.zeros(4), ddof=2)


def test_beta_zero_without_reference():
    logp, old, _, adv, mask = make_batch(6)
    lp, o, a, m = to32(logp, old, adv, mask)
    loss, met = grpo_loss(lp, o, None, a, m, eps_low=0.2, eps_high=0.2, beta=0.0, kl_estimator="k3", loss_type="bnpo")
    exp, _, _, _ = ref_loss_and_grad(
        logp, old, logp, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, est="k3", mode="bnpo"
    )
    np.testing.assert_allclose(loss, exp, rtol=2e-5)
    assert float(met["kl_mean"]) == 0.0


# ------------------------------------------------------------------ micro-batch split
@pytest.mark.parametrize("mode", MODES)
def test_microbatch_sum_denominator_is_exact(mode):
    logp, old, ref, adv, mask = make_batch(7, B=8, T=10)
    mask[2, 1:] = False  # very uneven token counts across the halves
    lp, o, r, a, m = to32(logp, old, ref, adv, mask)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.2, kl_estimator="k3", loss_type=mode, max_completion_length=10)
    full, _ = grpo_loss(lp, o, r, a, m, **kw)
    parts = [grpo_loss(lp[s], o[s], r[s], a[s], m[s], **kw)[1] for s in (slice(0, 4), slice(4, 8))]
    combined = sum(p["loss_sum"] for p in parts) / sum(p["denominator"] for p in parts)
    np.testing.assert_allclose(combined, full, rtol=1e-6)
    exp, _, _, _ = ref_loss_and_grad(
        logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.2, est="k3", mode=mode, max_len=10
    )
    np.testing.assert_allclose(full, exp, rtol=2e-5)
    # the naive mean of the two half losses is NOT the full-batch loss (the test is not vacuous)
    if mode in ("bnpo", "dapo", "grpo"):
        naive = np.mean([p["loss"] for p in parts])
        assert abs(naive - float(full)) > 1e-4


def test_padding_garbage_does_not_leak():
    logp, old, ref, adv, mask = make_batch(8)
    for x in (logp, old, ref):
        x[~mask] = np.nan
    logp[~mask] = 1e4
    lp, o, r, a, m = to32(logp, old, ref, adv, mask)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.2, kl_estimator="k3", loss_type="grpo")
    (loss, _), grad = grpo_loss_and_grad(lp, o, r, a, m, **kw)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_all_padding_batch_gives_zero_loss():
    z = jnp.zeros((2, 3))
    loss, met = grpo_loss(z, z, z, jnp.ones(2), jnp.zeros((2, 3), bool), **HP, kl_estimator="k3", loss_type="grpo")
    assert float(loss) == 0.0 and float(met["denominator"]) == 0.0


# ------------------------------------------------------------------ advantages
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_vs_numpy(ddof, scale):
    rng = np.random.default_rng(9)
    r = rng.normal(0, 1, (3, 5, 8)).astype(np.float32)
    r[0, 1] = 0.1  # zero-variance group whose mean is not exactly 0.1 in float32
    r[2, 4] = 1.0
    r[1, 2, :4] = 0.0  # partly equal: NOT zero-variance
    eps = 1e-4
    r64 = r.astype(np.float64)
    exp = np.zeros_like(r64)
    exp_flag = np.zeros(r.shape[:-1], bool)
    batch_std = r64.std(ddof=ddof)
    for idx in np.ndindex(*r.shape[:-1]):
        g = r64[idx]
        if np.all(g == g[0]):
            exp_flag[idx] = True
            continue
        c = g - g.mean()
        exp[idx] = {"group": c / (g.std(ddof=ddof) + eps), "batch": c / (batch_std + eps), "none": c}[scale]
    adv, flag = jax.jit(functools.partial(group_advantages, ddof=ddof, eps=eps, scale=scale))(r)
    np.testing.assert_array_equal(flag, exp_flag)
    assert exp_flag.sum() == 2
    np.testing.assert_allclose(adv, exp, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[exp_flag] == 0.0)  # exactly zero, not rounding noise


def test_group_advantages_hand():
    adv, flag = group_advantages(jnp.array([[1.0, 0.0, 1.0, 0.0], [0.7, 0.7, 0.7, 0.7]]), ddof=1, eps=0.0)
    s = math.sqrt(4 * 0.25 / 3)  # unbiased std of {1,0,1,0}
    np.testing.assert_allclose(adv[0], [0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s], rtol=1e-6)
    np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])
    np.testing.assert_array_equal(flag, [False, True])
    adv1, flag1 = group_advantages(jnp.array([[3.0]]), ddof=1)  # G = 1: trivially zero variance
    np.testing.assert_array_equal(adv1, [[0.0]])
    assert bool(flag1[0])
