"""GRPO pieces (DeepSeekMath), pure and jittable: advantages, KL estimators, clipped token loss.

Shapes: ``B`` sequences (any leading shape ``[...]`` works), ``T`` generated-token positions,
``G`` rollouts per group. Log-probs are per generated token; ``mask`` marks real generated tokens.
Everything is computed in at least float32 (bf16 log-prob *differences* are too coarse).

Per token, with ``ratio = exp(logp - old_logp)`` and the sequence's advantage ``A``::

    loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * w_t * KL_t

with ``w_t = 1`` (DeepSeekMath), or ``w_t = ratio`` (differentiable, also on-policy where its value is
1) under ``kl_bias_correction`` (TRL's ``use_bias_correction_kl``, DeepSeek-V3.2: the importance-weighted
KL whose gradient is the unbiased reverse-KL gradient).

Aggregation follows TRL's ``loss_type`` names but returns ``(loss_sum, denominator)`` (as in
google/tunix) so that summing both over micro-batches or devices and dividing once gives exactly
the full-batch loss; see :func:`aggregate`.

The paper fixes ``beta = 0.2`` and ``G = 8`` only. It states neither the clip range, the KL
estimator nor the aggregation, so every function here takes them as required keyword arguments;
the usual choices are ``eps_low = eps_high = 0.2`` (PPO), ``kl_estimator = "k3"`` (DeepSeekMath's
unbiased, non-negative estimator) and ``loss_type = "grpo"`` (DeepSeekMath's per-sequence mean).
"""

from __future__ import annotations

import difflib
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "ADVANTAGE_SCALES",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "aggregate",
    "group_advantages",
    "grpo_loss",
    "grpo_token_loss",
    "kl_estimate",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the closest valid choice."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {kind} {value!r}: expected one of {choices}{hint}")


def _as_float(x: Any) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------
def group_advantages(rewards: Any, *, ddof: int, eps: float = 1e-4, scale: str = "group") -> tuple[Array, Array]:
    """Group-relative advantages over the last axis.

    Args:
      rewards: ``[..., G]``, one scalar reward per rollout of each group.
      ddof: 1 for the unbiased std (what ``torch.std`` and hence TRL use), 0 for the population std.
        Required: the two differ by ``sqrt(G / (G - 1))`` (7 % at G = 8).
      eps: added to the std, ``A = (r - mean) / (std + eps)`` (TRL uses 1e-4).
      scale: ``"group"``: std over each group; ``"batch"``: one std over *all* rewards in the
        array (TRL's ``scale_rewards="batch"``; under sharding it is the std of what was passed);
        ``"none"``: ``A = r - mean`` (Dr. GRPO).

    Returns:
      ``(advantages [..., G], zero_var [...])``. ``zero_var`` flags groups whose rewards are all
      exactly equal; their advantages are set to exactly 0 under every ``scale`` (the centred
      values would otherwise be float rounding noise, amplified by ``1 / eps``). Such a group
      carries no policy-gradient signal (only the KL term acts on it); callers should count them
      and may drop them from the loss mask (DAPO-style dynamic sampling).
    """
    _check_choice("advantage scale", scale, ADVANTAGE_SCALES)
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    r = _as_float(rewards)
    g = r.shape[-1]
    centered = r - jnp.mean(r, axis=-1, keepdims=True)
    zero_var = jnp.all(r == r[..., :1], axis=-1)
    if scale == "group":
        std = jnp.sqrt(jnp.sum(centered**2, axis=-1, keepdims=True) / max(g - ddof, 1))
        adv = centered / (std + eps)
    elif scale == "batch":
        std = jnp.sqrt(jnp.sum((r - jnp.mean(r)) ** 2) / max(r.size - ddof, 1))
        adv = centered / (std + eps)
    else:
        adv = centered
    return jnp.where(zero_var[..., None], 0.0, adv), zero_var


# --------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------
def kl_estimate(logp: Any, ref_logp: Any, estimator: str) -> Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``; elementwise.

    With ``d = ref_logp - logp``:

    * ``"k1"``: ``-d = logp - ref_logp`` (unbiased, can be negative, high variance);
    * ``"k2"``: ``0.5 * d**2`` (biased, non-negative);
    * ``"k3"``: ``exp(d) - d - 1`` (unbiased, non-negative; DeepSeekMath / TRL). Computed as
      ``max(expm1(d) - d, 0)``, accurate for small ``|d|`` and never negative. It grows like
      ``exp(d)`` and overflows float32 for ``d > ~88``.
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    d = _as_float(ref_logp) - _as_float(logp)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


# --------------------------------------------------------------------------------------------
# token loss
# --------------------------------------------------------------------------------------------
def grpo_token_loss(
    logp: Any,
    old_logp: Any | None,
    ref_logp: Any | None,
    advantages: Any,
    mask: Any,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    kl_estimator: str,
    kl_bias_correction: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Clipped-surrogate GRPO loss per token.

    Args:
      logp: ``[..., T]`` log-probs of the sampled tokens under the policy being optimised.
      old_logp: ``[..., T]`` under the sampling policy; ``None`` means on-policy
        (``stop_gradient(logp)``, so ``ratio == 1`` but the gradient is ``-A``).
      ref_logp: ``[..., T]`` under the reference policy; may be ``None`` only when ``beta == 0``.
      advantages: ``[...]`` (one per sequence, broadcast over tokens) or ``[..., T]``.
      mask: ``[..., T]`` bool/0-1, True on generated (non-padding) tokens.
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO's decoupled clip).
      beta: KL coefficient (paper: 0.2).
      kl_estimator: ``"k1" | "k2" | "k3"`` (see :func:`kl_estimate`).
      kl_bias_correction: weight ``KL_t`` by the (unclipped, differentiable) ``ratio``, as TRL's
        ``use_bias_correction_kl`` (TRL 1.16 default True; here False, DeepSeekMath's plain KL term).

    Returns:
      ``(loss [..., T], stats)``: ``loss_t = -min(ratio*A, clip(ratio)*A) + beta*w_t*KL_t`` on masked
      tokens and exactly 0 elsewhere (padding inputs are neutralised first, so garbage there cannot
      leak NaNs into gradients). ``stats`` (scalars, no gradient) over masked tokens:
      ``clip_low`` = fraction with ``ratio < 1 - eps_low`` and ``A < 0``, ``clip_high`` = fraction with
      ``ratio > 1 + eps_high`` and ``A > 0`` (tokens where the clipped branch wins, i.e. zero
      policy gradient), ``clip`` = their sum, ``kl_mean`` = token mean of ``KL_t``, ``num_tokens``.
    """
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip eps must be >= 0, got eps_low={eps_low!r}, eps_high={eps_high!r}")
    logp = _as_float(logp)
    m = jnp.broadcast_to(jnp.asarray(mask).astype(bool), logp.shape)
    old = jax.lax.stop_gradient(logp) if old_logp is None else _as_float(old_logp)
    logp = jnp.where(m, logp, 0.0)
    old = jnp.where(m, old, 0.0)
    adv = _as_float(advantages)
    if adv.ndim == logp.ndim - 1:
        adv = adv[..., None]
    adv = jnp.broadcast_to(adv, logp.shape)

    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)

    if ref_logp is None:
        if not (isinstance(beta, int | float) and beta == 0):
            raise ValueError("ref_logp is required when beta != 0")
        kl = jnp.zeros_like(logp)
    else:
        kl = kl_estimate(logp, jnp.where(m, _as_float(ref_logp), 0.0), kl_estimator)
    kl_term = kl * ratio if kl_bias_correction else kl
    loss = jnp.where(m, pg + beta * kl_term, 0.0)

    n = jnp.sum(m).astype(logp.dtype)
    n_safe = jnp.maximum(n, 1.0)
    low = jnp.sum(m & (ratio < 1.0 - eps_low) & (adv < 0)) / n_safe
    high = jnp.sum(m & (ratio > 1.0 + eps_high) & (adv > 0)) / n_safe
    stats = {
        "clip_low": low,
        "clip_high": high,
        "clip": low + high,
        "kl_mean": jnp.sum(jnp.where(m, kl, 0.0)) / n_safe,
        "num_tokens": n,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def aggregate(
    per_token_loss: Any, mask: Any, mode: str, *, max_completion_length: int | None = None
) -> tuple[Array, Array]:
    """Reduce ``[..., T]`` token losses to ``(loss_sum, denominator)``; loss = sum / denominator.

    With ``l`` the masked token losses, ``n_b`` the masked-token count of sequence ``b`` and ``S`` the
    number of sequences with at least one masked token (all-padding rows, e.g. from static-shape
    bucketing, are not counted; TRL counts every row, which is the same when none is empty):

    * ``"grpo"``: ``sum_b (sum_t l_bt / n_b)`` over ``S`` -- the mean over sequences of each
      sequence's token mean (DeepSeekMath). The denominator counts *sequences*, not tokens.
    * ``"bnpo"``: ``sum_bt l_bt`` over ``sum_b n_b`` -- token mean over the batch.
      ``"dapo"`` is the same reduction (TRL's ``dapo`` only differs in normalising by the global
      token count, which summing denominators across devices already does).
    * ``"dr_grpo"``: ``sum_bt l_bt`` over ``S * max_completion_length`` (Dr. GRPO's constant
      normaliser). ``max_completion_length`` defaults to ``T``; pass it explicitly when
      micro-batches may be padded to different ``T``.

    Summing ``loss_sum`` and ``denominator`` separately over micro-batches / devices and dividing
    once reproduces the full-batch loss exactly, for every mode.
    """
    _check_choice("loss_type", mode, LOSS_TYPES)
    loss = _as_float(per_token_loss)
    m = jnp.broadcast_to(jnp.asarray(mask).astype(bool), loss.shape)
    loss = jnp.where(m, loss, 0.0)
    per_seq_tokens = jnp.sum(m, axis=-1).astype(loss.dtype)
    num_seqs = jnp.sum(per_seq_tokens > 0).astype(loss.dtype)
    if mode == "grpo":
        seq_means = jnp.sum(loss, axis=-1) / jnp.maximum(per_seq_tokens, 1.0)
        return jnp.sum(seq_means), num_seqs
    if mode in ("bnpo", "dapo"):
        return jnp.sum(loss), jnp.sum(per_seq_tokens)
    length = loss.shape[-1] if max_completion_length is None else max_completion_length
    return jnp.sum(loss), num_seqs * length


def grpo_loss(
    logp: Any,
    old_logp: Any | None,
    ref_logp: Any | None,
    advantages: Any,
    mask: Any,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    kl_estimator: str,
    loss_type: str,
    max_completion_length: int | None = None,
    kl_bias_correction: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Scalar GRPO loss = :func:`grpo_token_loss` reduced by :func:`aggregate`.

    Returns:
      ``(loss, metrics)`` with ``loss = loss_sum / denominator`` (0 for an all-padding batch) and
      ``metrics`` = the token-loss stats plus ``loss``, ``loss_sum`` and ``denominator`` (no
      gradient). For gradient accumulation, sum ``metrics["loss_sum"]`` / ``["denominator"]``
      instead of averaging ``loss``.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    per_token, stats = grpo_token_loss(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        kl_estimator=kl_estimator,
        kl_bias_correction=kl_bias_correction,
    )
    total, denom = aggregate(per_token, mask, loss_type, max_completion_length=max_completion_length)
    loss = jnp.where(denom > 0, total / jnp.maximum(denom, 1e-30), 0.0)
    metrics = dict(stats, loss=loss, loss_sum=total, denominator=denom)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
