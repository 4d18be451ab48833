"""Sampling summaries for the RL stage: one prefill per distinct prompt, then a `lax.while_loop` decode.

Prefix sharing: the P distinct (left-padded) prompts, with their images, are encoded and prefilled
once; the cache is then broadcast to their G samples (rows p*G .. p*G+G-1 belong to prompt p).
Each step draws a token from `logits / temperature` restricted by top-k / top-p, records its
log-prob under the *full-vocabulary* `log_softmax(logits / temperature)` (the quantity the trainer
recomputes), and stops a row at any stop id ([RET], EOS). Rows that reach `max_new_tokens` without
a stop get [RET] appended; a row that stops on another stop id (EOS) has that token replaced by [RET]
(neither is a sampled token: both are masked out of the log-probs). Every sequence ends in one [RET].

With ``ret_embedding``, the sampler also returns the [RET] embedding of each row: the final hidden state
(after the last RMSNorm) where [RET] is fed to the model, L2-normalised -- the vector a teacher-forced
pass over prompt + tokens reads at position ``lengths - 1``. A row that stops on [RET] gets it from that
decode step; one that stops on EOS is fed [RET] in its place (its tokens say [RET] there); one that
runs out of budget is fed the appended [RET] in one extra decode step (run only when such a row exists).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elva_jax.model import backbone
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.embedding import l2_normalize
from elva_jax.parallel.sharding import fitting_sharding


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    max_new_tokens: int = 32  # summary length budget (paper: not stated)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    cache_dtype: str = "bfloat16"
    # on a mesh: sample from logits whose vocabulary axis is gathered (rows stay over the batch axes).
    # Left split over `tensor` (as the LM head leaves them), the cumulative sums of the draw ran
    # pathologically slowly: a tiny-model rollout on a CPU (2,2,2) mesh took 247 s, 3.3 s gathered.
    mesh: Any = None


class Samples(NamedTuple):
    tokens: jnp.ndarray  # [N, T] int32 generated tokens, [RET] included, pad after it
    logps: jnp.ndarray  # [N, T] fp32 sampler log-probs of the sampled tokens (0 elsewhere)
    mask: jnp.ndarray  # [N, T] bool: sampled tokens (an appended or substituted [RET] is not: False)
    lengths: jnp.ndarray  # [N] int32 number of tokens including the final [RET]
    forced_ret: jnp.ndarray  # [N] bool: [RET] appended because max_new_tokens was reached
    ret_emb: jnp.ndarray | None = None  # [N, D] fp32 L2-normalised [RET] hidden state (``ret_embedding``)


#: vocabulary block of the two-stage top-k (`kth_largest`)
TOP_K_BLOCK = 8192


def kth_largest(logits: jnp.ndarray, k: int, block: int = TOP_K_BLOCK) -> jnp.ndarray:
    """The k-th largest value of each row [..., V] -> [..., 1], exactly as ``lax.top_k(x, k)[0][..., -1:]``.

    Two stages: the top k of each vocabulary block of ``block``, then the top k of those (each of the
    row's k largest is among its block's k largest, so the k-th value is the same, ties included). XLA's
    CPU top-k over a 150k vocabulary is sort-bound: 17 s for 144 x 151936 rows, 0.5 s in two stages (2-core
    AVX2 CPU)."""
    V = logits.shape[-1]
    if V <= 2 * block or k > block:
        return jax.lax.top_k(logits, k)[0][..., -1:]
    pad = (-V) % block
    x = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    x = x.reshape(*logits.shape[:-1], (V + pad) // block, block)
    cand = jax.lax.top_k(x, k)[0].reshape(*logits.shape[:-1], -1)
    return jax.lax.top_k(cand, k)[0][..., -1:]


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
    """Mask (to -inf) tokens outside the top-k and outside the smallest nucleus with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = kth_largest(logits, top_k)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the tokens whose preceding mass is < top_p (always keeps the first)
        keep_sorted = (cum - probs) < top_p
        thresh = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < thresh, -jnp.inf, logits)
    return logits


def categorical_inverse_cdf(key, logits):
    """Exact draw from softmax(logits) [..., V] by inverse transform: one uniform per row.

    token = min{i : cumsum(p)_i > u * sum(p)}. Equivalent in distribution to Gumbel-max
    (`jax.random.categorical`) but needs 1 random number per row instead of V, which dominates the cost
    of a decode step on CPU for a 150k vocabulary (profiled: 47 ms -> ~2 ms for 16 x 151669).
    Tokens with -inf logits have probability 0 and are never drawn.
    """
    p = jax.nn.softmax(logits, axis=-1)
    c = jnp.cumsum(p, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * c[..., -1:]
    return jnp.argmax(c > u, axis=-1).astype(jnp.int32)


def sample_token(key, logits, scfg: SamplerConfig):
    """(token [N] int32, logp [N] fp32 under the full-vocabulary log_softmax(logits / T))."""
    scaled = logits.astype(jnp.float32) / scfg.temperature
    if scfg.mesh is not None:
        scaled = jax.lax.with_sharding_constraint(scaled, fitting_sharding(scaled.shape, ("batch", None), scfg.mesh))
    tok = categorical_inverse_cdf(key, filter_logits(scaled, scfg.top_k, scfg.top_p))
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, logp


def repeat_rows(tree, g: int):
    """Repeat every array's batch axis g times (row p -> rows p*g .. p*g+g-1).

    KV caches carry the batch on axis 1 (k, v: [layers, B, ...]); valid/next_pos on axis 0.
    """
    if isinstance(tree, backbone.KVCache):
        return backbone.KVCache(
            k=jnp.repeat(tree.k, g, axis=1),
            v=jnp.repeat(tree.v, g, axis=1),
            valid=jnp.repeat(tree.valid, g, axis=0),
            index=tree.index,
            next_pos=jnp.repeat(tree.next_pos, g, axis=0),
        )
    return jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), tree)


def generate(
    params: dict,
    prompts: dict,
    key: jax.Array,
    cfg: ModelConfig,
    opts: ModelOptions,
    scfg: SamplerConfig,
    *,
    num_samples: int,
    stop_ids: tuple[int, ...],
    ret_id: int,
    pad_id: int,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    ret_embedding: bool = False,
) -> Samples:
    """Sample `num_samples` continuations of each prompt. prompts: model inputs [P, L] (left padded).

    Jittable with static config/ids; returns rows ordered prompt-major ([P * G, T]). ``ret_embedding``:
    also return each row's [RET] embedding (``Samples.ret_emb``, see the module docstring).
    """
    P, L = prompts["input_ids"].shape
    T = scfg.max_new_tokens + 1  # room for a forced [RET]
    cache = backbone.init_cache(cfg, P, L + T, dtype=jnp.dtype(scfg.cache_dtype))
    out, cache = backbone.prefill(params, prompts, cache, cfg, opts, lora=lora, lora_scale=lora_scale, logits="last")
    logits = jnp.repeat(out.logits, num_samples, axis=0)
    cache = repeat_rows(cache, num_samples)
    N = P * num_samples
    stops = jnp.asarray(stop_ids, jnp.int32)
    dec = lambda tok, cache: backbone.decode_step(params, tok, cache, cfg, opts, lora=lora, lora_scale=lora_scale)  # noqa: E731

    def cond(c):
        t, _, _, done, *_ = c
        return (t < scfg.max_new_tokens) & ~jnp.all(done)

    def body(c):
        t, logits, cache, done, toks, logps, mask, key, ret_h = c
        key, sub = jax.random.split(key)
        tok, lp = sample_token(sub, logits, scfg)
        tok = jnp.where(done, pad_id, tok)
        toks = toks.at[:, t].set(tok)
        logps = logps.at[:, t].set(jnp.where(done, 0.0, lp))
        mask = mask.at[:, t].set(~done)
        stop_now = ~done & jnp.isin(tok, stops)
        done = done | stop_now
        # a row that stops is fed [RET] (for an EOS, in its place): only that row's embedding reads it,
        # the row's later steps are discarded
        feed = jnp.where(stop_now, ret_id, tok) if ret_embedding else tok
        h, logits, cache = dec(feed, cache)
        if ret_embedding:
            ret_h = jnp.where(stop_now[:, None], h.astype(jnp.float32), ret_h)
        return t + 1, logits, cache, done, toks, logps, mask, key, ret_h

    init = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        jnp.zeros((N,), bool),
        jnp.full((N, T), pad_id, jnp.int32),
        jnp.zeros((N, T), jnp.float32),
        jnp.zeros((N, T), bool),
        key,
        jnp.zeros((N, cfg.text.hidden_size) if ret_embedding else (0,), jnp.float32),
    )
    _, _, cache, done, toks, logps, mask, _, ret_h = jax.lax.while_loop(cond, body, init)
    n = jnp.sum(mask, axis=1).astype(jnp.int32)
    pos = jnp.arange(T)[None]
    last = jnp.take_along_axis(toks, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    # stopped on a stop id other than [RET] (EOS): that token becomes [RET] (not sampled, masked out)
    other_stop = done & (last != ret_id)
    at_last = pos == (n - 1)[:, None]
    toks = jnp.where(other_stop[:, None] & at_last, ret_id, toks)
    mask = mask & ~(other_stop[:, None] & at_last)
    logps = jnp.where(mask, logps, 0.0)
    # ran out of budget: [RET] appended after the last sampled token
    forced = ~done
    toks = jnp.where(forced[:, None] & (pos == n[:, None]), ret_id, toks)
    emb = None
    if ret_embedding:
        # rows out of budget: one more decode step feeds the appended [RET] (slot L + max_new_tokens)
        def appended(ret_h):
            h, _, _ = dec(jnp.where(forced, ret_id, pad_id).astype(jnp.int32), cache)
            return jnp.where(forced[:, None], h.astype(jnp.float32), ret_h)

        emb = l2_normalize(jax.lax.cond(jnp.any(forced), appended, lambda r: r, ret_h))
    return Samples(toks, logps, mask, n + forced.astype(jnp.int32), forced, emb)
