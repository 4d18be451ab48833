"""Qwen2.5-VL vision tower: patch embedding, RMSNorm blocks with 2-D RoPE and a gated SiLU MLP,
window attention in most blocks and full attention in a few, and an RMSNorm PatchMerger.

Images arrive packed as for Qwen2-VL (`elva_jax.model.vision`): `patches` [R, Lv, C*T*P*P],
`segment_ids` [R, Lv] (k > 0: the k-th image of the row, 0: padding), `pos_hw` [R, Lv, 2] (patch
row/col in merge-window order), plus `window` [R, Lv, 2] = (frame, window) of each patch within its
image (`window_ids`).

transformers permutes the merge units into window order, attends within each window (cu_seqlens)
and restores the order after the merger. Every op but attention acts per token or per merge unit,
and masked attention does not care about token order, so here the tokens stay in place and a block
attends within (image, frame, window) in window blocks and within (image, frame) in full blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.model.config import ModelOptions, VisionConfig
from elva_jax.model.layers import attention, dense, precision, rms_norm
from elva_jax.model.rope import apply_rope, vision_cos_sin


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig(VisionConfig):
    """Qwen2.5-VL's vision fields on top of `VisionConfig` (`embed_dim` is the config's `hidden_size`).

    intermediate_size: the gated MLP's width. window_size: window side in pixels (a window spans
    window_size // spatial_merge_size // patch_size merge units per side). fullatt_block_indexes:
    the blocks with full (per-frame) attention. tokens_per_second: video time scale of M-RoPE.
    layer_norm_eps: the RMSNorm eps (transformers fixes it at 1e-6).
    """

    intermediate_size: int = 0
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 4.0

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def window_units(self) -> int:
        """Merge units per window side."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def window_ids(image_grid_thw: np.ndarray, cfg: Qwen25VisionConfig) -> np.ndarray:
    """(frame, window) of every patch [N, 2] int32, in pixel_values order (merge-window order).

    A frame's merged grid (h/m, w/m) is tiled by square windows of `cfg.window_units` merge units from
    the top-left corner (the last row / column of windows may be partial); windows are numbered
    row-major within the image, frames 0..t-1.
    """
    m, ws = cfg.spatial_merge_size, cfg.window_units
    out = []
    for t, h, w in np.asarray(image_grid_thw).tolist():
        lh, lw = h // m, w // m
        nw = -(-lw // ws)
        ii, jj = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
        win = ((ii // ws) * nw + jj // ws).reshape(-1)  # per merge unit, row-major = merge-window order
        win = np.repeat(win, m * m)
        frame = np.repeat(np.arange(t), lh * lw * m * m)
        out.append(np.stack([frame, np.tile(win, t)], -1))
    if not out:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(out).astype(np.int32)


def _block(x, p, full, cos, sin, masks, cfg: Qwen25VisionConfig, dtype, prec):
    R, Lv, Dv = x.shape
    mask = jnp.where(full, masks[0], masks[1])
    h = rms_norm(x, p["norm1"]["scale"], cfg.layer_norm_eps)
    qkv = dense(h, p["qkv"], dtype, prec).reshape(R, Lv, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # rotation in fp32, as the reference does
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(dtype)
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(dtype)
    o = attention(q, k, v, mask, prec).reshape(R, Lv, Dv)
    x = x + dense(o, p["proj"], dtype, prec)
    h = rms_norm(x, p["norm2"]["scale"], cfg.layer_norm_eps)
    g = jax.nn.silu(dense(h, p["gate_proj"], dtype, prec)) * dense(h, p["up_proj"], dtype, prec)
    return x + dense(g, p["down_proj"], dtype, prec)


def vision_forward(
    params: dict,
    patches,
    segment_ids,
    pos_hw,
    window,
    cfg: Qwen25VisionConfig,
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
    frame, win = window[..., 0], window[..., 1]
    same_frame = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    same_frame &= frame[:, :, None] == frame[:, None, :]
    same_window = same_frame & (win[:, :, None] == win[:, None, :])
    full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

    def step(h, xs):
        p, f = xs
        h = _block(h, p, f, cos, sin, (same_frame, same_window), cfg, dtype, prec)
        return h, (h if return_layers else None)

    if opts.remat:
        step = jax.checkpoint(step)
    x, per_layer = jax.lax.scan(step, x, (params["blocks"], full), unroll=opts.scan_unroll)
    # PatchMerger: RMSNorm, concat each m*m window (contiguous), MLP with exact GELU.
    mp = params["merger"]
    h = rms_norm(x, mp["ln_q"]["scale"], cfg.layer_norm_eps)
    u = cfg.merge_unit
    h = h.reshape(R * Lv // u, u * cfg.embed_dim)
    h = dense(jax.nn.gelu(dense(h, mp["fc1"], dtype, prec), approximate=False), mp["fc2"], dtype, prec)
    valid = seg.reshape(R * Lv // u, u)[:, 0] > 0
    if return_layers:
        return h, valid, per_layer
    return h, valid
