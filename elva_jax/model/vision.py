"""Qwen2-VL vision tower: patch embedding, pre-LN blocks with 2-D RoPE, PatchMerger.

Images arrive packed in R rows of Lv patches (static shapes): `patches` [R, Lv, C*T*P*P],
`segment_ids` [R, Lv] (k > 0: the k-th frame of an image or video in the row, 0: padding), `pos_hw` [R, Lv, 2] (patch
row/col in merge-window order). Attention is full within a frame and blocked between frames and images
(the cu_seqlens of transformers as a segment mask). Lv must be a multiple of merge_size^2 and
every image starts on a merge-window boundary (true when images are packed whole).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elva_jax.model.config import ModelOptions, VisionConfig
from elva_jax.model.layers import attention, dense, layer_norm, precision, quick_gelu
from elva_jax.model.rope import apply_rope, vision_cos_sin


def _block(x, p, cos, sin, mask, cfg: VisionConfig, dtype, prec):
    R, Lv, Dv = x.shape
    h = layer_norm(x, p["norm1"], cfg.layer_norm_eps)
    qkv = dense(h, p["qkv"], dtype, prec).reshape(R, Lv, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # rotation in fp32, as the reference does
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(dtype)
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(dtype)
    o = attention(q, k, v, mask, prec).reshape(R, Lv, Dv)
    x = x + dense(o, p["proj"], dtype, prec)
    h = layer_norm(x, p["norm2"], cfg.layer_norm_eps)
    x = x + dense(quick_gelu(dense(h, p["fc1"], dtype, prec)), p["fc2"], dtype, prec)
    return x


def vision_forward(
    params: dict,
    patches,
    segment_ids,
    pos_hw,
    cfg: VisionConfig,
    opts: ModelOptions,
    return_layers: bool = False,
):
    """Merged image features [R * Lv / m^2, out_hidden] and their validity [R * Lv / m^2] bool.

    (If return_layers, also the per-block outputs [depth, R, Lv, Dv].)
    """
    dtype = jnp.dtype(opts.dtype)
    prec = precision(opts.matmul_precision)
    R, Lv, _ = patches.shape
    x = dense(patches.astype(dtype), params["patch_embed"], dtype, prec)
    cos, sin = vision_cos_sin(pos_hw, cfg.head_dim, cfg.rope_theta)
    seg = segment_ids
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)

    def step(h, p):
        h = _block(h, p, cos, sin, mask, cfg, dtype, prec)
        return h, (h if return_layers else None)

    if opts.remat:
        step = jax.checkpoint(step)
    x, per_layer = jax.lax.scan(step, x, params["blocks"], unroll=opts.scan_unroll)
    # PatchMerger: LN, concat each m*m window (contiguous), MLP with exact GELU.
    mp = params["merger"]
    h = layer_norm(x, mp["ln_q"], cfg.layer_norm_eps)
    u = cfg.merge_unit
    h = h.reshape(R * Lv // u, u * cfg.embed_dim)
    h = dense(jax.nn.gelu(dense(h, mp["fc1"], dtype, prec), approximate=False), mp["fc2"], dtype, prec)
    valid = seg.reshape(R * Lv // u, u)[:, 0] > 0
    if return_layers:
        return h, valid, per_layer
    return h, valid
