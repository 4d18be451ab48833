"""elva_jax's GRPO loss and gradient pinned to a plain torch (float64, autograd) transcription of TRL 1.16's
definitions (``GRPOTrainer._compute_loss`` with ``importance_sampling_level="token"``, no two-sided ``delta``,
no vLLM correction; advantages of ``_generate_and_score_completions`` with ``scale_rewards="group"``).

TRL's definitions, as written in its source:
  A = (r - mean_group(r)) / (std_group(r) + 1e-4), std with Bessel's correction (ddof 1);
  coef_1 = exp(logp - old_logp) (old_logp = logp.detach() on-policy); coef_2 = clamp(coef_1, 1 - e_lo, 1 + e_hi);
  kl = exp(ref - logp) - (ref - logp) - 1, times coef_1 when use_bias_correction_kl (its default);
  l = -min(coef_1 A, coef_2 A) + beta kl;
  grpo: mean_b(sum_t l m / max(sum_t m, 1)); bnpo: sum l m / max(sum m, 1); dr_grpo: sum l m / (B * max_len);
  dapo: sum l m / num_items_in_batch (all masked tokens of the batch on one process, no accumulation).
Every row below has at least one token (TRL's grpo mean counts empty rows, elva_jax's does not).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elva_jax.rl import grpo

MODES = ["grpo", "bnpo", "dr_grpo", "dapo"]
EPS_LO, EPS_HI, BETA = 0.2, 0.28, 0.2
G, GROUPS, T = 4, 3, 6


def trl_advantages(rewards: torch.Tensor, g: int) -> torch.Tensor:
    mean = rewards.view(-1, g).mean(dim=1).repeat_interleave(g)
    std = rewards.view(-1, g).std(dim=1).repeat_interleave(g)  # torch.std: unbiased (ddof 1)
    return (rewards - mean) / (std + 1e-4)


def trl_loss(logp, old, ref, adv, mask, *, loss_type, bias_correction, max_len):
    old = logp.detach() if old is None else old
    coef_1 = torch.exp(logp - old)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    if bias_correction:
        kl = kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - EPS_LO, 1 + EPS_HI)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a) + BETA * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, num_items_in_batch on one process


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    B = G * GROUPS
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    logp = -rng.uniform(0.1, 3.0, size=(B, T))
    # old log-probs off by up to +-0.5: many ratios fall outside [0.8, 1.28] so both clip branches are exercised
    old = logp + rng.uniform(-0.5, 0.5, size=(B, T))
    ref = logp + rng.normal(0, 0.3, size=(B, T))
    rewards = rng.normal(size=B)
    return dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards)


def test_advantages_match_trl_with_ddof_1(case):
    trl = trl_advantages(torch.tensor(case["rewards"]), G).numpy()
    ours, _ = grpo.group_advantages(jnp.asarray(case["rewards"].reshape(GROUPS, G), jnp.float32), ddof=1, eps=1e-4)
    np.testing.assert_allclose(np.asarray(ours).reshape(-1), trl, rtol=1e-5, atol=1e-6)
    # elva_jax's default ddof 0 is not TRL's: they differ by sqrt(G / (G - 1)) (up to the eps)
    ours0, _ = grpo.group_advantages(jnp.asarray(case["rewards"].reshape(GROUPS, G), jnp.float32), ddof=0, eps=1e-4)
    ratio = np.asarray(ours0).reshape(-1) / trl
    np.testing.assert_allclose(ratio, np.sqrt(G / (G - 1)), rtol=1e-3)


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("bias_correction", [False, True], ids=["plain_kl", "bias_corrected_kl"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_and_gradient_match_trl(case, mode, bias_correction, on_policy):
    adv_t = trl_advantages(torch.tensor(case["rewards"]), G)
    lp_t = torch.tensor(case["logp"], requires_grad=True)
    old_t = None if on_policy else torch.tensor(case["old"])
    want = trl_loss(
        lp_t,
        old_t,
        torch.tensor(case["ref"]),
        adv_t,
        torch.tensor(case["mask"]),
        loss_type=mode,
        bias_correction=bias_correction,
        max_len=T,
    )
    want.backward()

    adv, _ = grpo.group_advantages(jnp.asarray(case["rewards"].reshape(GROUPS, G), jnp.float32), ddof=1, eps=1e-4)

    def f(lp):
        loss, _ = grpo.grpo_loss(
            lp,
            None if on_policy else jnp.asarray(case["old"], jnp.float32),
            jnp.asarray(case["ref"], jnp.float32),
            adv.reshape(-1),
            jnp.asarray(case["mask"] > 0),
            eps_low=EPS_LO,
            eps_high=EPS_HI,
            beta=BETA,
            kl_estimator="k3",
            loss_type=mode,
            max_completion_length=T,
            kl_bias_correction=bias_correction,
        )
        return loss

    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(case["logp"], jnp.float32))
    np.testing.assert_allclose(float(loss), want.item(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), lp_t.grad.numpy(), rtol=2e-4, atol=1e-6)


def test_bias_correction_changes_the_on_policy_gradient_not_the_loss(case):
    """On-policy the ratio is 1 but differentiable: the corrected KL has the same value, another gradient."""
    args = (
        jnp.asarray(case["logp"], jnp.float32),
        None,
        jnp.asarray(case["ref"], jnp.float32),
        jnp.zeros(G * GROUPS),
        jnp.asarray(case["mask"] > 0),
    )
    kw = dict(eps_low=EPS_LO, eps_high=EPS_HI, beta=BETA, kl_estimator="k3", loss_type="bnpo")
    out = {}
    for bc in (False, True):
        out[bc] = jax.value_and_grad(lambda lp, bc=bc: grpo.grpo_loss(lp, *args[1:], **kw, kl_bias_correction=bc)[0])(
            args[0]
        )
    np.testing.assert_allclose(float(out[True][0]), float(out[False][0]), rtol=1e-6)
    # d(ratio * kl)/d logp - d kl/d logp = kl (ratio = 1): bnpo spreads beta * kl_t over the batch's tokens
    d = case["ref"] - case["logp"]
    kl = (np.exp(d) - d - 1) * case["mask"]
    want = BETA * kl / case["mask"].sum()
    np.testing.assert_allclose(np.asarray(out[True][1]) - np.asarray(out[False][1]), want, rtol=1e-3, atol=1e-7)
    assert want.max() > 1e-4
