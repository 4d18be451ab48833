"""Qwen2 / Qwen3 text decoder as one `lax.scan` over stacked layers, with an optional KV cache.

Layer: x += o_proj(attn(rope(q), rope(k), v)) on RMSNorm(x); x += down(silu(gate) * up) on RMSNorm(x).
GQA; projections add a bias where the param table has one (Qwen2: q/k/v; Qwen3: none); Qwen3 applies
a per-head RMSNorm to q and k before RoPE (`TextConfig.qk_norm`). M-RoPE cos/sin (blocked or
interleaved sections) are computed once from [3, B, T] positions and shared by layers. DeepStack
(Qwen3-VL): per-layer visual features added to the output of the first decoder layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elva_jax.model.config import ModelOptions, TextConfig
from elva_jax.model.layers import attention, dense, precision, rms_norm
from elva_jax.model.rope import apply_rope, mrope_cos_sin

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer(x, p, lora, cos, sin, mask, kv, cache_index, cfg: TextConfig, dtype, prec, lora_scale):
    B, T, _ = x.shape
    lp = (lambda n: None) if lora is None else (lambda n: lora.get(n))
    h = rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps)
    q = dense(h, p["q_proj"], dtype, prec, lp("q_proj"), lora_scale).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = dense(h, p["k_proj"], dtype, prec, lp("k_proj"), lora_scale).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = dense(h, p["v_proj"], dtype, prec, lp("v_proj"), lora_scale).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"]["scale"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["scale"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if kv is not None:
        ck, cv = kv
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        new_kv = (k, v)
        k, v = k.astype(dtype), v.astype(dtype)
    else:
        new_kv = None
    o = attention(q, k, v, mask, prec).reshape(B, T, cfg.num_heads * cfg.head_dim)
    x = x + dense(o, p["o_proj"], dtype, prec, lp("o_proj"), lora_scale)
    h = rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    g = dense(h, p["gate_proj"], dtype, prec, lp("gate_proj"), lora_scale)
    u = dense(h, p["up_proj"], dtype, prec, lp("up_proj"), lora_scale)
    x = x + dense(jax.nn.silu(g) * u, p["down_proj"], dtype, prec, lp("down_proj"), lora_scale)
    return x, new_kv


def decoder_forward(
    params: dict,
    embeds: jnp.ndarray,
    positions: jnp.ndarray,
    mask: jnp.ndarray,
    cfg: TextConfig,
    opts: ModelOptions,
    *,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    cache: tuple | None = None,
    cache_index=0,
    return_layers: bool = False,
    deepstack: jnp.ndarray | None = None,
):
    """Run all decoder layers and the final norm.

    embeds [B, T, D]; positions [3, B, T]; mask [B, T, S] bool (S = T without cache, the cache
    length with one); lora: pytree mirroring params["layers"] (stacked "a"/"b" per target) or None;
    cache: (k, v) each [layers, B, S, Hkv, head_dim], written at `cache_index`.
    deepstack: [k, B, T, D] (zeros at non-visual tokens) or None: deepstack[i] is added to the output
    of layer i for i < k (transformers' `_deepstack_process`); the input of layer i + 1 includes it.
    Returns (hidden [B, T, D] after the final norm, new cache or None, per-layer inputs
    [layers, B, T, D] or None).
    """
    dtype = jnp.dtype(opts.dtype)
    prec = precision(opts.matmul_precision)
    cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    x = embeds.astype(dtype)
    if deepstack is not None and deepstack.shape[0] == 0:
        deepstack = None
    if deepstack is not None:
        deepstack = deepstack[: cfg.num_layers].astype(dtype)  # transformers ignores extra levels
        n_deep = deepstack.shape[0]

    def step(h, xs):
        p, lo, kv, i = xs
        h, new_kv = _layer(h, p, lo, cos, sin, mask, kv, cache_index, cfg, dtype, prec, lora_scale)
        out = h  # the layer's output before any DeepStack add (what transformers reports per layer)
        if deepstack is not None:
            # features of layer i (read in the loop: no per-layer copy padded to the layer count)
            d = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(i, n_deep - 1), keepdims=False)
            h = jnp.where(i < n_deep, h + d, h)
        return h, (new_kv, out if return_layers else None)

    if opts.remat:
        step = jax.checkpoint(step, prevent_cse=False)
    index = None if deepstack is None else jnp.arange(cfg.num_layers)
    x0 = x
    x, (new_cache, outs) = jax.lax.scan(step, x, (params["layers"], lora, cache, index), unroll=opts.scan_unroll)
    # input of layer i as transformers' hidden_states[i] reports it: the embeddings, then each layer's
    # output (before a DeepStack add)
    per_layer = jnp.concatenate([x0[None], outs[:-1]]) if return_layers else None
    x = rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps)
    return x, new_cache, per_layer
