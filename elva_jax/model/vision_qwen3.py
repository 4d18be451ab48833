"""Qwen3-VL vision tower: biased patch embedding plus an interpolated learned position table, pre-LN
blocks with 2-D RoPE and a GELU(tanh) MLP, a PatchMerger, and DeepStack mergers.

Same packing as the Qwen2-VL tower (`elva_jax.model.vision`): images arrive whole in R rows of Lv patch
slots in merge-window order, with `segment_ids` [R, Lv] (k > 0: k-th image of the row, 0: padding)
and `pos_hw` [R, Lv, 2]. The learned position table (side x side, side = int(sqrt(num_position_embeddings)))
is resampled to each image's grid by bilinear interpolation with align_corners=True; its four taps
and weights per patch are host inputs (`pos_embed_taps`), so the device only gathers and sums.

DeepStack: the hidden states after each block listed in `deepstack_visual_indexes` go through their
own merger, whose LayerNorm acts on the concatenated m*m window ("post-shuffle") instead of on each
patch; the decoder adds them to the outputs of its first layers at the image tokens.

Attention spans one segment: the packing (`inputs.pack_images`) gives every temporal patch of a video
its own segment id, as transformers' `cu_seqlens` split a multi-frame grid per frame.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.model.config import ModelOptions, PatchGeometry, VisionConfig
from elva_jax.model.layers import attention, dense, layer_norm, precision
from elva_jax.model.rope import apply_rope, vision_cos_sin


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(VisionConfig):
    """VisionConfig with the Qwen3-VL fields (MLP width given directly, position table, DeepStack)."""

    intermediate_size: int = 0
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def geometry(self) -> PatchGeometry:
        """The image geometry with Qwen3-VL's video rule (timestamped frames, `elva_jax.data.media.video`)."""
        return dataclasses.replace(super().geometry, video_rule="timestamps")

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings**0.5)  # as transformers computes it


# ---------------------------------------------------------------- host side


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps [n, 2] into a `side`-long axis and their fp32 weights, align_corners=True
    (the float32 arithmetic of transformers' `_interpolation_axis_taps_weights`)."""
    src = (index.astype(np.float32) * np.float32(side - 1)) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets)
    weights = np.maximum(np.float32(1) - dist, np.float32(0)).astype(np.float32)
    return taps, weights


def pos_embed_taps(image_grid_thw: np.ndarray, spatial_merge_size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [N, 4] int32 into the flattened side x side position table and weights [N, 4] fp32 for
    every patch in merge-window order (frames of a video repeat the image's taps)."""
    m = spatial_merge_size
    idx, wts = [], []
    for t, h, w in np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rows = rows.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        ht, hw = _axis_taps(rows, np.full_like(rows, h), side)
        wt, ww = _axis_taps(cols, np.full_like(cols, w), side)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        x = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(x, (t, 1)))
    if not idx:
        return np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)
    return np.concatenate(idx).astype(np.int32), np.concatenate(wts).astype(np.float32)


# ---------------------------------------------------------------- device side


def _block(x, p, cos, sin, mask, cfg: Qwen3VisionConfig, dtype, prec):
    R, Lv, Dv = x.shape
    h = layer_norm(x, p["norm1"], cfg.layer_norm_eps)
    qkv = dense(h, p["qkv"], dtype, prec).reshape(R, Lv, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(dtype)  # rotation in fp32, as the reference
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(dtype)
    o = attention(q, k, v, mask, prec).reshape(R, Lv, Dv)
    x = x + dense(o, p["proj"], dtype, prec)
    h = layer_norm(x, p["norm2"], cfg.layer_norm_eps)
    return x + dense(jax.nn.gelu(dense(h, p["fc1"], dtype, prec), approximate=True), p["fc2"], dtype, prec)


def _merge(x, p, cfg: Qwen3VisionConfig, dtype, prec, postshuffle: bool):
    """[R, Lv, Dv] -> [R * Lv / m^2, out]: LN (per patch, or per window when `postshuffle`), concat each
    m*m window, fc1, exact GELU, fc2."""
    u = cfg.merge_unit
    R, Lv, Dv = x.shape
    if postshuffle:
        h = layer_norm(x.reshape(R * Lv // u, u * Dv), p["norm"], cfg.layer_norm_eps)
    else:
        h = layer_norm(x, p["norm"], cfg.layer_norm_eps).reshape(R * Lv // u, u * Dv)
    return dense(jax.nn.gelu(dense(h, p["fc1"], dtype, prec), approximate=False), p["fc2"], dtype, prec)


def vision_forward(
    params: dict,
    patches,
    segment_ids,
    pos_hw,
    taps,
    tap_weights,
    cfg: Qwen3VisionConfig,
    opts: ModelOptions,
):
    """(merged features [R * Lv / m^2, out_hidden], validity [R * Lv / m^2] bool, DeepStack features
    [k, R * Lv / m^2, out_hidden] or None), k = the number of distinct `deepstack_visual_indexes`.

    taps [R, Lv, 4] int32 / tap_weights [R, Lv, 4] fp32: `pos_embed_taps` packed like the patches.
    """
    dtype = jnp.dtype(opts.dtype)
    prec = precision(opts.matmul_precision)
    R, Lv, _ = patches.shape
    x = dense(patches.astype(dtype), params["patch_embed"], dtype, prec)
    table = params["pos_embed"]["embedding"].astype(jnp.float32)
    w = tap_weights.astype(jnp.float32)
    pos = sum(jnp.take(table, taps[..., j], axis=0) * w[..., j, None] for j in range(taps.shape[-1]))
    x = x + pos.astype(dtype)
    cos, sin = vision_cos_sin(pos_hw, cfg.head_dim, cfg.rope_theta)
    seg = segment_ids
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)

    def step(h, p):
        return _block(h, p, cos, sin, mask, cfg, dtype, prec), None

    if opts.remat:
        step = jax.checkpoint(step)
    # one scan per run of blocks between DeepStack taps (no per-block copies of the activations)
    after, start = {}, 0
    for stop in sorted(set(cfg.deepstack_visual_indexes)) + [cfg.depth - 1]:
        if stop >= start:
            blocks = jax.tree.map(lambda a, s=start, e=stop + 1: a[s:e], params["blocks"])
            x, _ = jax.lax.scan(step, x, blocks, unroll=min(opts.scan_unroll, stop + 1 - start))
            start = stop + 1
        after[stop] = x
    feats = _merge(x, params["merger"], cfg, dtype, prec, postshuffle=False)
    valid = seg.reshape(R * Lv // cfg.merge_unit, cfg.merge_unit)[:, 0] > 0
    if not cfg.deepstack_visual_indexes:
        return feats, valid, None
    # as transformers: level i is the i-th tapped block in depth order, through the merger listed
    # at that block's (first) position in deepstack_visual_indexes
    order = [(layer, cfg.deepstack_visual_indexes.index(layer)) for layer in sorted(set(cfg.deepstack_visual_indexes))]
    deep = [
        _merge(after[layer], jax.tree.map(lambda a, j=j: a[j], params["deepstack"]), cfg, dtype, prec, True)
        for layer, j in order
    ]
    return feats, valid, jnp.stack(deep)
