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


def _layer(x, p, lora, cos, sin, mask, kv, cache_index, cfg: TextConfig, dtype, prec, lora_scale, drop=None):
    """One decoder layer. drop: None or (layer key, rate): LoRA dropout, an independent mask per target."""
    B, T, _ = x.shape
    lp = (lambda n: None) if lora is None else (lambda n: lora.get(n))

    def dense_t(h, n):
        d = None if drop is None else (jax.random.fold_in(drop[0], LORA_TARGETS.index(n)), drop[1])
        return dense(h, p[n], dtype, prec, lp(n), lora_scale, dropout=d)

    h = rms_norm(x, p["input_norm"]["scale"], cfg.rms_norm_eps)
    q = dense_t(h, "q_proj").reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = dense_t(h, "k_proj").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = dense_t(h, "v_proj").reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
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
    x = x + dense_t(o, "o_proj")
    h = rms_norm(x, p["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    g = dense_t(h, "gate_proj")
    u = dense_t(h, "up_proj")
    x = x + dense_t(jax.nn.silu(g) * u, "down_proj")
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
    lora_dropout: tuple | None = None,
):
    """Run all decoder layers and the final norm.

    embeds [B, T, D]; positions [3, B, T]; mask [B, T, S] bool (S = T without cache, the cache
    length with one); lora: pytree mirroring params["layers"] (stacked "a"/"b" per target) or None;
    cache: (k, v) each [layers, B, S, Hkv, head_dim], written at `cache_index`.
    deepstack: [k, B, T, D] (zeros at non-visual tokens) or None: deepstack[i] is added to the output
    of layer i for i < k (transformers' `_deepstack_process`); the input of layer i + 1 includes it.
    lora_dropout: None or (key, rate > 0): dropout on every LoRA branch's input (training forwards only);
    layer i uses fold_in(key, i), each target its own mask from it.
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

    use_drop = lora is not None and lora_dropout is not None and lora_dropout[1] > 0
    layer_keys = None
    if use_drop:  # layer i: fold_in(key, i), carried through the scan with the layer's weights
        layer_keys = jax.vmap(lambda i: jax.random.fold_in(lora_dropout[0], i))(jnp.arange(cfg.num_layers))

    def step(h, xs):
        p, lo, kv, i, lk = xs
        drop = None if lk is None else (lk, lora_dropout[1])
        h, new_kv = _layer(h, p, lo, cos, sin, mask, kv, cache_index, cfg, dtype, prec, lora_scale, drop)
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
    xs = (params["layers"], lora, cache, index, layer_keys)
    x, (new_cache, outs) = jax.lax.scan(step, x, xs, unroll=opts.scan_unroll)
    # input of layer i as transformers' hidden_states[i] reports it: the embeddings, then each layer's
    # output (before a DeepStack add)
    per_layer = jnp.concatenate([x0[None], outs[:-1]]) if return_layers else None
    x = rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps)
    return x, new_cache, per_layer
