"""Stage-3 rewards: margin + ranking reward over one rollout's candidate similarities.

Conventions (every function here is pure, jittable and works over any leading batch shape):

* ``sims``: float ``[..., C]`` cosine similarities of the query to its ``C`` candidates.
  ``sims[..., 0]`` is the positive, ``sims[..., 1:]`` are the negatives. Values must be finite.
* ``valid``: optional bool ``[..., C]``; ``False`` marks padding. A padded candidate gets no rank,
  does not move anybody else's rank and adds nothing to any sum. The positive is always treated
  as valid (``valid[..., 0]`` is forced to ``True``).

Ranks are computed *sort-free* from pairwise comparisons (``O(C^2)`` memory per row, which is
tiny for C ~ 100) so the whole reward is a handful of fused elementwise ops under ``jit``::

    rank_i = 1 + #{valid j : s_j > s_i} + #{valid j < i : s_j == s_i}

which equals, bit for bit, the 1-based position of ``i`` in a *stable* descending sort of the
valid candidates (ties are broken by candidate index). Replacing the indicator by
``sigmoid((s_j - s_i) / t)`` gives soft ranks and a ranking reward differentiable in ``sims``.

Formulas (``log`` is ``log_b x = ln x / ln b``; ``r`` the positive's rank, ``k`` a negative's rank,
both in the full list of valid candidates)::

    R_rank   = s_pos / (1 + log r) - gamma * sum_{valid negatives} s_k * (log k - 1)
    R_margin = max(0, s_pos - max_{valid negatives} s_k - delta)
    R        = alpha * R_margin + epsilon * R_rank
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from elva_jax.schema.rl import RewardConfig

Array = jax.Array

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_GAMMA",
    "DEFAULT_SOFT_TEMPERATURE",
    "RewardConfig",
    "margin_reward",
    "ranking_reward",
    "ranks",
    "reward_from_config",
    "soft_ranking_loss",
    "soft_ranking_reward",
    "soft_ranks",
    "total_reward",
]

# The paper gives none of these; see RewardConfig (the run schema's) for the reasoning behind each value.
DEFAULT_GAMMA = RewardConfig.gamma
DEFAULT_DELTA = RewardConfig.delta
DEFAULT_SOFT_TEMPERATURE = RewardConfig.soft_temperature


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_float(sims: Any) -> Array:
    """Promote to at least float32 (bf16 -> f32 is exact and order preserving)."""
    sims = jnp.asarray(sims)
    return sims.astype(jnp.promote_types(sims.dtype, jnp.float32))


def _valid_mask(sims: Array, valid: Any | None) -> Array:
    """Bool ``[..., C]`` mask with the positive (index 0) forced valid."""
    if valid is None:
        return jnp.ones(sims.shape, dtype=bool)
    valid = jnp.broadcast_to(jnp.asarray(valid, dtype=bool), sims.shape)
    return valid.at[..., 0].set(True)


def _log_base_divisor(log_base: Any) -> Any:
    """``ln(log_base)``; checks ``log_base > 1`` when it is a concrete Python number."""
    if isinstance(log_base, int | float):
        if not log_base > 1.0:
            raise ValueError(f"log_base must be > 1, got {log_base!r}")
        return math.log(log_base)
    return jnp.log(log_base)


def _check_temperature(temperature: Any) -> None:
    if isinstance(temperature, int | float) and not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


# --------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------
def ranks(sims: Any, valid: Any | None = None) -> Array:
    """Sort-free 1-based descending ranks, identical to a stable descending sort.

    Args:
      sims: ``[..., C]`` scores (finite).
      valid: optional bool ``[..., C]`` (index 0 is forced valid).

    Returns:
      int32 ``[..., C]``: ``rank_i = 1 + #{valid j: s_j > s_i} + #{valid j < i: s_j == s_i}`` for
      valid ``i``; ``0`` for padded entries (a value no reward ever reads). Valid ranks are a
      permutation of ``1..n_valid``.
    """
    s = jnp.asarray(sims)
    v = _valid_mask(s, valid)
    c = s.shape[-1]
    s_i = s[..., :, None]  # row i: the candidate being ranked
    s_j = s[..., None, :]  # column j: the candidate it is compared with
    earlier = jnp.arange(c)[None, :] < jnp.arange(c)[:, None]  # [C, C], j < i
    beats = ((s_j > s_i) | ((s_j == s_i) & earlier)) & v[..., None, :]
    r = 1 + jnp.sum(beats, axis=-1, dtype=jnp.int32)
    return jnp.where(v, r, 0).astype(jnp.int32)


def soft_ranks(sims: Any, *, temperature: Any, valid: Any | None = None) -> Array:
    """Differentiable ranks: ``rank_i = 1 + sum_{valid j != i} sigmoid((s_j - s_i) / temperature)``.

    Args:
      sims: ``[..., C]`` scores.
      temperature: ``t > 0``; differences much larger than ``t`` count as hard comparisons.
      valid: optional bool ``[..., C]`` (index 0 is forced valid).

    Returns:
      float ``[..., C]``, ``>= 1`` on valid entries and ``0`` on padded ones. As ``t -> 0`` this
      tends to :func:`ranks` when the valid scores are distinct. Tied scores tend to the *average*
      of the tied positions instead (``sigmoid(0) = 0.5``: each member of a tied pair contributes
      0.5 to the other's rank), e.g. two candidates tied for first both get rank 1.5 rather than
      1 and 2.
    """
    _check_temperature(temperature)
    s = _as_float(sims)
    v = _valid_mask(s, valid)
    c = s.shape[-1]
    p = jax.nn.sigmoid((s[..., None, :] - s[..., :, None]) / temperature)  # [..., i, j]
    not_self = ~jnp.eye(c, dtype=bool)
    p = jnp.where(v[..., None, :] & not_self, p, 0.0)
    return jnp.where(v, 1.0 + jnp.sum(p, axis=-1), 0.0)


# --------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------
def _ranking_from_ranks(s: Array, r: Array, v: Array, gamma: Any, log_base: Any) -> Array:
    """``s_pos / (1 + log r_pos) - gamma * sum_{valid neg} s_k (log r_k - 1)``; ``[..., C] -> [...]``."""
    ln_b = _log_base_divisor(log_base)
    r = jnp.where(v, r, 1).astype(s.dtype)  # padded -> 1 so log stays finite (and its grad too)
    log_r = jnp.log(r) / ln_b
    pos = s[..., 0] / (1.0 + log_r[..., 0])
    neg = jnp.sum(jnp.where(v[..., 1:], s[..., 1:] * (log_r[..., 1:] - 1.0), 0.0), axis=-1)
    return pos - gamma * neg


def ranking_reward(sims: Any, *, gamma: Any, log_base: Any = math.e, valid: Any | None = None) -> Array:
    """Hard ranking reward ``[..., C] -> [...]``.

    ``R = s_pos / (1 + log r) - gamma * sum_{valid k >= 1} s_k * (log rank_k - 1)`` with ranks from
    :func:`ranks` (ties broken by candidate index: a negative tied with the positive ranks below
    it). ``log`` is in base ``log_base`` (> 1). Differentiable in ``sims`` only through the
    similarities themselves (ranks are piecewise constant).
    """
    s = _as_float(sims)
    v = _valid_mask(s, valid)
    return _ranking_from_ranks(s, ranks(s, v), v, gamma, log_base)


def soft_ranking_reward(
    sims: Any,
    *,
    gamma: Any,
    temperature: Any,
    log_base: Any = math.e,
    valid: Any | None = None,
) -> Array:
    """:func:`ranking_reward` with :func:`soft_ranks`; smooth in ``sims``, ``[..., C] -> [...]``.

    Tends to the hard reward as ``temperature -> 0`` when scores are distinct; tied candidates
    tend to the average of their tied positions (see :func:`soft_ranks`). Gradients are finite
    for any ``temperature > 0`` and padding.
    """
    s = _as_float(sims)
    v = _valid_mask(s, valid)
    return _ranking_from_ranks(s, soft_ranks(s, temperature=temperature, valid=v), v, gamma, log_base)


def margin_reward(sims: Any, *, delta: Any, valid: Any | None = None) -> Array:
    """Triplet-style margin reward ``[..., C] -> [...]``.

    ``R = max(0, s_pos - max_{valid negatives} s_k - delta)``.
    If a row has no valid negative (all padded, or ``C == 1``) the hardest-negative similarity is
    taken as ``0`` (an orthogonal candidate), i.e. ``R = max(0, s_pos - delta)``: the reward stays
    bounded (``<= 1``) and still pays for a well-aligned positive, consistent with the ranking
    reward, whose negative sum is then empty.
    """
    s = _as_float(sims)
    v = _valid_mask(s, valid)
    if s.shape[-1] == 1:
        hardest = jnp.zeros(s.shape[:-1], s.dtype)
    else:
        vn = v[..., 1:]
        hardest = jnp.max(jnp.where(vn, s[..., 1:], -jnp.inf), axis=-1)
        hardest = jnp.where(jnp.any(vn, axis=-1), hardest, 0.0)
    return jnp.maximum(0.0, s[..., 0] - hardest - delta)


def total_reward(
    sims: Any,
    *,
    alpha: Any = 0.4,
    epsilon: Any = 0.6,
    gamma: Any,
    delta: Any,
    log_base: Any = math.e,
    valid: Any | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``R = alpha * R_margin + epsilon * R_rank`` (paper: alpha = 0.4, epsilon = 0.6).

    Returns:
      ``(total [...], {"margin": [...], "ranking": [...]})`` (components unweighted).
    """
    m = margin_reward(sims, delta=delta, valid=valid)
    r = ranking_reward(sims, gamma=gamma, log_base=log_base, valid=valid)
    return alpha * m + epsilon * r, {"margin": m, "ranking": r}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def reward_from_config(sims: Any, cfg: RewardConfig, valid: Any | None = None) -> tuple[Array, dict[str, Array]]:
    """:func:`total_reward` with every hyperparameter taken from ``cfg``."""
    return total_reward(
        sims,
        alpha=cfg.alpha,
        epsilon=cfg.epsilon,
        gamma=cfg.gamma,
        delta=cfg.delta,
        log_base=cfg.log_base,
        valid=valid,
    )


def soft_ranking_loss(sims: Any, cfg: RewardConfig, valid: Any | None = None) -> Array:
    """Auxiliary differentiable loss: ``-mean(soft_ranking_reward(sims))`` over all leading dims.

    Uses ``cfg.gamma``, ``cfg.soft_temperature`` and ``cfg.log_base``. Back-propagates through the
    similarities (hence the embeddings); a scalar.
    """
    r = soft_ranking_reward(sims, gamma=cfg.gamma, temperature=cfg.soft_temperature, log_base=cfg.log_base, valid=valid)
    return -jnp.mean(r)
