"""Embed-RL's rewards (arXiv 2602.13823; official ``verl/workers/reward_model/vlm2vec_reward.py``) as pure,
jittable functions over the frozen embedder's in-batch similarities.

A batch holds ``Q`` query rollouts and ``P`` positive rollouts (each of a pair's query and positive gets
G rollouts; every rollout is embedded with its own CoT). ``sims[i, j] = <q_i, p_j>`` of the L2-normalised
embeddings; ``row_pairs[i]`` / ``col_pairs[j]`` name each rollout's pair. For query row ``i`` (and, on
``sims.T``, for every positive row) with ``S`` = the columns of its own pair (all G rollouts of the pair's
positive, not only the diagonal) and ``N`` = the rest::

    n       = |S|                     (``top_n > 0`` replaces it by a fixed n)
    acc     = |top_n(row) & S| / n    (ties at the cut: see ``ties``)
    margin  = mean_{j in S} s_ij - sum_{j in N} softmax_N(s_iN / t)_j * s_ij    (0 for an empty S or N)
    ORM     = scale * acc * margin    (official: scale 0.5, t 0.5)
    PRM     = margin if the judge picks one of the pair's own rollouts, else 0
    R       = w_format * format + w_orm * ORM + w_prm * PRM    (official: 0.05, 0.8, 0.2)

The official code computes ORM and PRM for every rollout whatever its format; format only adds its term.

``ties``: the official ``torch.topk`` leaves the order of equal similarities unspecified. ``"average"``
(default) counts the tied block at the cut by its expected share (the mean of acc over every order of the
tied entries; equal to the official value whenever the cut is untied, and invariant to how rollouts are
laid out in the batch); ``"index"`` breaks ties by column index (a stable descending sort).

Similarities must be finite. Rows of shape ``[Q]``, ``sims`` ``[Q, P]``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from elva_jax.schema import project
from elva_jax.schema.rl import TIES, EmbedRLRewardConfig

Array = jax.Array

ANSWER_PARSE = ("strict", "first_integer")

__all__ = [
    "EmbedRLRewardConfig",
    "batch_rewards",
    "embed_rl_reward_config",
    "format_reward",
    "judge_candidates",
    "judge_verdicts",
    "orm_reward",
    "orm_rows",
    "parse_judge_choice",
    "prm_candidates",
    "prm_reward",
    "reward_weights",
    "total_reward",
]


def embed_rl_reward_config(cfg) -> EmbedRLRewardConfig:
    """The reward config of a run config (its ``embed_rl`` section)."""
    return project(EmbedRLRewardConfig, cfg.embed_rl)


def format_reward(flags: Any) -> Array:
    """Per-rollout format reward (float32): the parser's flags (``elva_jax.data.tcot.parser.format_flags``)."""
    return jnp.asarray(flags).astype(jnp.float32)


def _top_share(s: Array, same: Array, n: Array, ties: str) -> Array:
    """Per row: how many of the top ``n`` entries of ``s`` are ``same`` (a float, see ``ties``)."""
    if ties == "index":
        order = jnp.argsort(-s, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)  # 0-based position of every column
        return jnp.sum(same & (rank < n[:, None]), axis=-1).astype(s.dtype)
    srt = -jnp.sort(-s, axis=-1)
    cut = jnp.take_along_axis(srt, jnp.clip(n - 1, 0, s.shape[-1] - 1)[:, None], axis=-1)  # [Q, 1]
    above, tied = s > cut, s == cut
    slots = n - jnp.sum(above, axis=-1)
    n_tied = jnp.maximum(jnp.sum(tied, axis=-1), 1)
    share = jnp.sum(above & same, axis=-1) + slots * jnp.sum(tied & same, axis=-1) / n_tied
    return share.astype(s.dtype)


def orm_rows(
    sims: Any,
    row_pairs: Any,
    col_pairs: Any,
    *,
    negative_temperature: float = 0.5,
    scale: float = 0.5,
    top_n: int = 0,
    ties: str = "average",
) -> dict[str, Array]:
    """ORM of every row of ``sims`` ``[Q, P]``: ``{"orm", "acc", "margin"}``, each ``[Q]``.

    ``row_pairs`` ``[Q]`` / ``col_pairs`` ``[P]``: integer pair ids. ``top_n`` must be static."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {list(TIES)}, got {ties!r}")
    s = jnp.asarray(sims)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    same = jnp.asarray(row_pairs)[:, None] == jnp.asarray(col_pairs)[None, :]
    count = jnp.sum(same, axis=-1)
    n = count if top_n == 0 else jnp.full_like(count, min(top_n, s.shape[-1]))
    acc = jnp.where(n > 0, _top_share(s, same, n, ties) / jnp.maximum(n, 1), 0.0)
    pos_mean = jnp.sum(jnp.where(same, s, 0.0), axis=-1) / jnp.maximum(count, 1)
    neg = ~same
    has_neg = jnp.any(neg, axis=-1)
    logits = jnp.where(neg, s / negative_temperature, -jnp.inf)
    logits = jnp.where(has_neg[:, None], logits, 0.0)  # a row without negatives: no NaN, weight unused
    w = jax.nn.softmax(logits, axis=-1)
    neg_mean = jnp.where(has_neg, jnp.sum(jnp.where(neg, w * s, 0.0), axis=-1), 0.0)
    margin = pos_mean - neg_mean
    return {"orm": scale * acc * margin, "acc": acc, "margin": margin}


def orm_reward(sims: Any, pair_ids: Any, col_pair_ids: Any | None = None, **kw) -> dict[str, dict[str, Array]]:
    """ORM of the query rows (``sims``) and of the positive rows (``sims.T``):
    ``{"query": orm_rows(...), "positive": orm_rows(...)}``. ``col_pair_ids`` defaults to ``pair_ids``
    (query rollout i and positive rollout i of one pair, as the official batch lays them out)."""
    cols = pair_ids if col_pair_ids is None else col_pair_ids
    s = jnp.asarray(sims)
    return {"query": orm_rows(s, pair_ids, cols, **kw), "positive": orm_rows(s.T, cols, pair_ids, **kw)}


def prm_reward(judge_correct: Any, margin: Any) -> Array:
    """PRM: the ORM margin where the judge picked one of the row's own-pair rollouts, else 0."""
    margin = jnp.asarray(margin)
    return jnp.where(jnp.asarray(judge_correct, bool), margin, jnp.zeros_like(margin))


def prm_candidates(sims: Any, row_pairs: Any, col_pairs: Any, *, num_pairs: int, hard_pairs: int = 4):
    """The judge's other-pair candidates of every row: the ``hard_pairs`` other pairs whose most similar
    rollout is most similar to the row, each represented by that rollout (the official choice).

    Returns ``(cols [Q, K], valid [Q, K])``: column indices, hardest first (ties: the lower pair id, then
    the lower column), and False where the batch has fewer than K other pairs. ``num_pairs`` static,
    pair ids in ``[0, num_pairs)``."""
    s = jnp.asarray(sims)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    col_pairs, row_pairs = jnp.asarray(col_pairs), jnp.asarray(row_pairs)
    member = col_pairs[None, :] == jnp.arange(num_pairs)[:, None]  # [K_all, P]
    per_pair = jnp.where(member[None], s[:, None, :], -jnp.inf)  # [Q, K_all, P]
    best = jnp.max(per_pair, axis=-1)
    best_col = jnp.argmax(per_pair, axis=-1)  # first maximum
    other = (jnp.arange(num_pairs)[None, :] != row_pairs[:, None]) & jnp.any(member, axis=-1)[None]
    best = jnp.where(other, best, -jnp.inf)
    k = min(hard_pairs, num_pairs)
    top, pair = jax.lax.top_k(best, k)
    return jnp.take_along_axis(best_col, pair, axis=-1), jnp.isfinite(top)


def judge_candidates(sims: Any, row_pairs: Any, col_pairs: Any, *, num_pairs: int, hard_pairs: int, num_own: int):
    """Every row's judge candidates in the official order: the row pair's own columns (index order), then
    its :func:`prm_candidates` (hardest other pair first).

    Returns ``(cols [Q, num_own + K], own [Q, num_own + K], valid [Q, num_own + K])`` with
    ``K = min(hard_pairs, num_pairs)``: column indices, whether each is one of the row's own pair, and
    False on padding (a row with fewer than ``num_own`` own columns or fewer than K other pairs).
    ``num_pairs``, ``hard_pairs`` and ``num_own`` static."""
    s = jnp.asarray(sims)
    same = jnp.asarray(row_pairs)[:, None] == jnp.asarray(col_pairs)[None, :]
    own_cols = jnp.argsort(~same, axis=-1, stable=True)[:, :num_own]  # own columns first, in index order
    own_valid = jnp.take_along_axis(same, own_cols, axis=-1)
    hard_cols, hard_valid = prm_candidates(s, row_pairs, col_pairs, num_pairs=num_pairs, hard_pairs=hard_pairs)
    cols = jnp.concatenate([own_cols, hard_cols], axis=-1)
    own = jnp.concatenate([own_valid, jnp.zeros_like(hard_valid)], axis=-1)
    return cols, own, jnp.concatenate([own_valid, hard_valid], axis=-1)


def judge_verdicts(choice: Any, own: Any) -> Array:
    """Whether each row's judge picked one of its own pair's rollouts: ``choice`` [Q] int, the 0-based
    position in the row's listed candidates (-1: unparsable, or not judged); ``own`` [Q, K] bool, the
    listed candidates that are the row's own (False on padding). Any choice outside [0, K) is wrong."""
    choice, own = jnp.asarray(choice), jnp.asarray(own, bool)
    K = own.shape[-1]
    picked = jnp.take_along_axis(own, jnp.clip(choice, 0, K - 1)[:, None], axis=-1)[:, 0]
    return (choice >= 0) & (choice < K) & picked


_STRICT_ANSWER = re.compile(r"\s*([0-9]+)\s*")
_FIRST_INTEGER = re.compile(r"\d+")


def parse_judge_choice(text: Any, num_candidates: int, mode: str = "strict") -> int:
    """The judge's answer -> the 0-based candidate it picked, or -1 (unparsable or out of 1..K).

    ``"strict"``: the whole answer, whitespace aside, is one number (ASCII digits 0-9) in 1..K.
    ``"first_integer"``: the first run of digits anywhere in the answer (official ``re.findall(r"\\d+")``)."""
    if mode not in ANSWER_PARSE:
        raise ValueError(f"judge answer parse must be one of {list(ANSWER_PARSE)}, got {mode!r}")
    if not isinstance(text, str):
        return -1
    m = _STRICT_ANSWER.fullmatch(text) if mode == "strict" else _FIRST_INTEGER.search(text)
    if m is None:
        return -1
    k = int(m.group(1 if mode == "strict" else 0)) - 1
    return k if 0 <= k < num_candidates else -1


def reward_weights(cfg: EmbedRLRewardConfig) -> tuple[float, float, float]:
    """The (format, ORM, PRM) weights in force: with the judge off PRM's weight is 0 and, for
    ``prm_off_weights="renormalise"``, format and ORM are scaled to the full weight sum."""
    wf, wo, wp = cfg.format_weight, cfg.orm_weight, cfg.prm_weight
    if cfg.prm_enabled:
        return wf, wo, wp
    if cfg.prm_off_weights == "renormalise":
        c = (wf + wo + wp) / (wf + wo)
        return wf * c, wo * c, 0.0
    return wf, wo, 0.0


def total_reward(fmt: Any, orm: Any, prm: Any | None, cfg: EmbedRLRewardConfig) -> Array:
    """``R = w_format * format + w_orm * ORM + w_prm * PRM`` with :func:`reward_weights` (``prm`` may be
    None when the judge is off)."""
    wf, wo, wp = reward_weights(cfg)
    r = wf * jnp.asarray(fmt, jnp.float32) + wo * jnp.asarray(orm, jnp.float32)
    if cfg.prm_enabled:
        if prm is None:
            raise ValueError("prm_enabled: total_reward needs the PRM rewards")
        r = r + wp * jnp.asarray(prm, jnp.float32)
    return r


def batch_rewards(
    sims: Any,
    pair_ids: Any,
    fmt_query: Any,
    fmt_positive: Any,
    cfg: EmbedRLRewardConfig,
    judge_query: Any | None = None,
    judge_positive: Any | None = None,
    col_pair_ids: Any | None = None,
) -> dict[str, dict[str, Array]]:
    """Every rollout's reward of one batch: ``{"query": {...}, "positive": {...}}``, each side with
    ``total``, ``format``, ``orm``, ``acc``, ``margin`` and ``prm`` per row. ``fmt_*``: format flags of
    the query / positive rollouts; ``judge_*``: the judge's verdicts (needed iff ``cfg.prm_enabled``)."""
    o = orm_reward(
        sims,
        pair_ids,
        col_pair_ids,
        negative_temperature=cfg.negative_temperature,
        scale=cfg.orm_scale,
        top_n=cfg.top_n,
        ties=cfg.ties,
    )
    out = {}
    for side, fmt, judge in (("query", fmt_query, judge_query), ("positive", fmt_positive, judge_positive)):
        rows = o[side]
        if cfg.prm_enabled and judge is None:
            raise ValueError(f"prm_enabled: batch_rewards needs the judge's verdicts for the {side} rows")
        prm = prm_reward(judge, rows["margin"]) if cfg.prm_enabled else jnp.zeros_like(rows["margin"])
        f = format_reward(fmt)
        out[side] = {**rows, "format": f, "prm": prm, "total": total_reward(f, rows["orm"], prm, cfg)}
    return out
