"""The backbone seam's forward passes: pure functions of (params, inputs, cfg) for every family.

`inputs` is a dict of arrays (all static shapes, see `elva_jax.model.inputs`):
  input_ids [B, L] int32, attention_mask [B, L] (1 = token), positions [3, B, L] int32, and, when the
  batch has images, patches [R, Lv, patch_dim], vision_segment_ids [R, Lv] and the family's per-patch
  inputs (e.g. vision_pos [R, Lv, 2]); images come first in the patch rows, then videos. The family's
  vision tower (`families.family_of(cfg)`) turns them into visual tokens: the first n_image of them
  replace the `<|image_pad|>` embeddings, the rest the `<|video_pad|>` embeddings, each in row-major
  batch order;
  a family with DeepStack also returns per-layer visual features added after the first decoder layers.

Three entry points: `forward` (full sequence), `prefill` (fills a KV cache) and `decode_step`
(one token per row against the cache); the latter two give the same logits as `forward`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.decoder import decoder_forward
from elva_jax.model.families import family_of
from elva_jax.model.layers import precision


class Output(NamedTuple):
    hidden: jnp.ndarray  # [B, L, D] final hidden states (after the last RMSNorm)
    logits: jnp.ndarray | None  # [B, L, V] fp32, when asked for
    layers: jnp.ndarray | None  # [layers, B, L, D] input of each decoder layer, when asked for


class KVCache(NamedTuple):
    k: jnp.ndarray  # [layers, B, S, Hkv, head_dim]
    v: jnp.ndarray
    valid: jnp.ndarray  # [B, S] bool: slot holds a real token
    index: jnp.ndarray  # [] int32: next slot to write (same for every row; prompts are left-padded)
    next_pos: jnp.ndarray  # [B] int32: position id of the next token of each row


def embed_inputs(params: dict, inputs: dict, cfg: ModelConfig, opts: ModelOptions):
    """(token embeddings [B, L, D] with visual tokens scattered into the `<|image_pad|>` and
    `<|video_pad|>` slots, DeepStack features [k, B, L, D] at those slots (zeros elsewhere) or None).

    Feature index of a slot: (its rank among the image slots) for an image slot, n_image_slots + (its
    rank among the video slots) for a video slot, as the packing puts images before videos.
    """
    dtype = jnp.dtype(opts.dtype)
    ids = inputs["input_ids"]
    x = jnp.take(params["text"]["embed_tokens"]["embedding"], ids, axis=0).astype(dtype)
    if "patches" not in inputs:
        return x, None
    feats, valid, deep = family_of(cfg).vision_forward(params["vision"], inputs, cfg, opts)
    n = feats.shape[0]
    # compact the real features to the front, in order (padding slots may sit between packed rows)
    (order,) = jnp.nonzero(valid, size=n, fill_value=0)
    real = inputs["attention_mask"].astype(bool)
    is_img = (ids == cfg.image_token_id) & real
    is_vid = (ids == cfg.video_token_id) & real
    img_rank = jnp.cumsum(is_img.reshape(-1)).reshape(ids.shape) - 1
    vid_rank = jnp.cumsum(is_vid.reshape(-1)).reshape(ids.shape) - 1 + jnp.sum(is_img)
    idx = jnp.clip(jnp.where(is_img, img_rank, vid_rank), 0, n - 1)
    is_vis = is_img | is_vid
    x = jnp.where(is_vis[..., None], feats[order].astype(dtype)[idx], x)
    if deep is None:
        return x, None
    deep = deep[:, order].astype(dtype)[:, idx]  # [k, B, L, D]
    return x, jnp.where(is_vis[None, ..., None], deep, 0)


def lm_head(params: dict, hidden: jnp.ndarray, cfg: ModelConfig, opts: ModelOptions) -> jnp.ndarray:
    """Logits [..., V] in fp32 (tied to the token table when the config says so). With a generation
    vocabulary (``opts.vocab``) only its rows are scored; every other logit is -1e9 (exp underflows to 0)."""
    dtype = jnp.dtype(opts.dtype)
    prec = precision(opts.matmul_precision)
    t = params["text"]
    if opts.vocab:
        ids = jnp.asarray(opts.vocab, jnp.int32)
        full = jnp.full((*hidden.shape[:-1], cfg.text.vocab_size), -1e9, jnp.float32)
        return full.at[..., ids].set(vocab_logits(params, hidden, cfg, opts))
    if cfg.tie_word_embeddings:
        w = t["embed_tokens"]["embedding"].astype(dtype)
        out = jnp.einsum("...d,vd->...v", hidden.astype(dtype), w, precision=prec, preferred_element_type=jnp.float32)
    else:
        w = t["lm_head"]["kernel"].astype(dtype)
        out = jnp.einsum("...d,dv->...v", hidden.astype(dtype), w, precision=prec, preferred_element_type=jnp.float32)
    return out.astype(jnp.float32)


def vocab_logits(params: dict, hidden: jnp.ndarray, cfg: ModelConfig, opts: ModelOptions) -> jnp.ndarray:
    """Logits [..., K] in fp32 of the generation vocabulary's K ids (``opts.vocab``, in that order) only."""
    t = params["text"]
    ids = jnp.asarray(opts.vocab, jnp.int32)
    w = t["embed_tokens"]["embedding"][ids] if cfg.tie_word_embeddings else t["lm_head"]["kernel"][:, ids].T
    dtype = jnp.dtype(opts.dtype)
    out = jnp.einsum(
        "...d,vd->...v",
        hidden.astype(dtype),
        w.astype(dtype),
        precision=precision(opts.matmul_precision),
        preferred_element_type=jnp.float32,
    )
    return out.astype(jnp.float32)


def causal_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """[B, L, L] bool: query i sees key j iff j <= i and j is a real token."""
    L = attention_mask.shape[1]
    tri = jnp.tril(jnp.ones((L, L), bool))
    return tri[None] & attention_mask.astype(bool)[:, None, :]


def forward(
    params: dict,
    inputs: dict,
    cfg: ModelConfig,
    opts: ModelOptions,
    *,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    with_logits: bool = False,
    return_layers: bool = False,
    lora_dropout: tuple | None = None,
) -> Output:
    """Full forward over [B, L] tokens (left or right padding). lora_dropout: None (eval, export, RL) or
    (key, rate): dropout on the LoRA branches' input, for training forwards (see decoder_forward)."""
    x, deep = embed_inputs(params, inputs, cfg, opts)
    mask = causal_mask(inputs["attention_mask"])
    h, _, layers = decoder_forward(
        params["text"],
        x,
        inputs["positions"],
        mask,
        cfg.text,
        opts,
        lora=lora,
        lora_scale=lora_scale,
        return_layers=return_layers,
        lora_dropout=lora_dropout,
        **({} if deep is None else {"deepstack": deep}),
    )
    logits = lm_head(params, h, cfg, opts) if with_logits else None
    return Output(h, logits, layers)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    t = cfg.text
    shape = (t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def prefill(
    params: dict,
    inputs: dict,
    cache: KVCache,
    cfg: ModelConfig,
    opts: ModelOptions,
    *,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    logits: str = "all",
) -> tuple[Output, KVCache]:
    """Encode a (left-padded) prompt [B, P] into an empty cache of length S >= P.

    Returns the prompt's hidden states, fp32 logits and the filled cache (slots 0..P-1 written,
    `next_pos` = 1 + the row's largest position id). logits: "all" [B, P, V]; "last" [B, V] (what a
    sampler needs: it predicts the first new token); "none".
    """
    x, deep = embed_inputs(params, inputs, cfg, opts)
    am = inputs["attention_mask"].astype(bool)
    B, P = am.shape
    S = cache.valid.shape[1]
    valid = jax.lax.dynamic_update_slice(cache.valid, am, (0, 0))
    q_pos = jnp.arange(P)[:, None]
    k_pos = jnp.arange(S)[None, :]
    mask = (k_pos <= q_pos)[None] & valid[:, None, :]
    h, (k, v), _ = decoder_forward(
        params["text"],
        x,
        inputs["positions"],
        mask,
        cfg.text,
        opts,
        lora=lora,
        lora_scale=lora_scale,
        cache=(cache.k, cache.v),
        cache_index=0,
        **({} if deep is None else {"deepstack": deep}),
    )
    pos_max = jnp.max(jnp.where(am[None], inputs["positions"], -1), axis=(0, 2))
    new = KVCache(k, v, valid, jnp.asarray(P, jnp.int32), (pos_max + 1).astype(jnp.int32))
    out = {
        "all": lambda: lm_head(params, h, cfg, opts),
        "last": lambda: lm_head(params, h[:, -1], cfg, opts),
        "none": lambda: None,
    }[logits]()
    return Output(h, out, None), new


def extend(
    params: dict,
    tokens: jnp.ndarray,
    lengths: jnp.ndarray,
    cache: KVCache,
    cfg: ModelConfig,
    opts: ModelOptions,
    *,
    lora: dict | None = None,
    lora_scale: float = 1.0,
) -> jnp.ndarray:
    """Run T text tokens per row after a filled cache in one pass (teacher forcing over a shared prefix).

    tokens [B, T] (row b's first `lengths[b]` are real), written at slots cache.index ..; each attends to
    the cache's valid slots and causally to its own row's earlier real tokens. Differentiable in the
    cache, so gradients reach the prefix. Returns hidden states [B, T, D] (after the final norm).
    """
    dtype = jnp.dtype(opts.dtype)
    x = jnp.take(params["text"]["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)
    B, T = tokens.shape
    S = cache.valid.shape[1]
    gen_valid = jnp.arange(T)[None] < lengths[:, None]
    valid = jax.lax.dynamic_update_slice(cache.valid, gen_valid, (0, cache.index))
    q_slot = cache.index + jnp.arange(T)
    mask = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & valid[:, None, :]
    positions = jnp.broadcast_to((cache.next_pos[:, None] + jnp.arange(T)[None])[None], (3, B, T))
    h, _, _ = decoder_forward(
        params["text"],
        x,
        positions,
        mask,
        cfg.text,
        opts,
        lora=lora,
        lora_scale=lora_scale,
        cache=(cache.k, cache.v),
        cache_index=cache.index,
    )
    return h


def decode_step(
    params: dict,
    tokens: jnp.ndarray,
    cache: KVCache,
    cfg: ModelConfig,
    opts: ModelOptions,
    *,
    lora: dict | None = None,
    lora_scale: float = 1.0,
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """Append one text token per row (tokens [B]); returns (hidden [B, D], logits [B, V] fp32, cache)."""
    dtype = jnp.dtype(opts.dtype)
    x = jnp.take(params["text"]["embed_tokens"]["embedding"], tokens[:, None], axis=0).astype(dtype)
    B = tokens.shape[0]
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((B, 1), bool), (0, cache.index))
    mask = valid[:, None, :]
    positions = jnp.broadcast_to(cache.next_pos[None, :, None], (3, B, 1))
    h, (k, v), _ = decoder_forward(
        params["text"],
        x,
        positions,
        mask,
        cfg.text,
        opts,
        lora=lora,
        lora_scale=lora_scale,
        cache=(cache.k, cache.v),
        cache_index=cache.index,
    )
    h = h[:, 0]
    new = KVCache(k, v, valid, cache.index + 1, cache.next_pos + 1)
    return h, lm_head(params, h, cfg, opts), new
