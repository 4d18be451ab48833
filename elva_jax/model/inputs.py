"""Host-side (numpy) assembly of model inputs with static shapes.

From transformers-style arrays (input_ids, attention_mask, pixel_values [N, patch_dim] concatenated over
images in batch order, image_grid_thw [n_images, 3], and for videos pixel_values_videos [Nv, patch_dim],
video_grid_thw [n_videos, 3] with t >= 1 temporal patches, second_per_grid_ts [n_videos]) build the
dict that `backbone.forward` takes: position ids for the chosen mode, and the visual patches (all
images, then all videos) packed whole into R rows of Lv patches (a fixed patch budget, so a run
compiles a handful of programs). Each temporal patch (frame) of a packed item is its own attention
segment, as transformers' `cu_seqlens` are.
"""

from __future__ import annotations

import numpy as np

from elva_jax.errors import UserError
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.families import family_of

# logical axes of the model-input arrays (rows first); a family's per-patch inputs default to
# ("batch", None, ...) like the patches they sit beside
INPUT_AXES = {
    "input_ids": ("batch", None),
    "attention_mask": ("batch", None),
    "positions": (None, "batch", None),
    "patches": ("batch", None, None),
    "vision_segment_ids": ("batch", None),
    "vision_pos": ("batch", None, None),
}


class PatchBudgetError(UserError, ValueError):
    """An image or video does not fit the batch's fixed patch budget (rows x row length)."""


def input_axes(name: str, ndim: int) -> tuple:
    """Logical axes of model input ``name`` with ``ndim`` dimensions (without a micro-batch axis)."""
    return INPUT_AXES.get(name, ("batch",) + (None,) * (ndim - 1))


def pack_images(
    pixel_values: np.ndarray,
    image_grid_thw: np.ndarray,
    *,
    rows: int | None = None,
    row_len: int | None = None,
    cfg: ModelConfig,
) -> dict[str, np.ndarray]:
    """Pack visual items (images or videos, in order) into `rows` x `row_len` patch slots; each item
    stays whole in one row.

    Greedy first-fit in order (so the merged features keep the item order when read row-major after
    dropping padding). Defaults: one row exactly as long as all patches (rounded to the merge unit).
    Returns patches [R, Lv, P], vision_segment_ids [R, Lv] (1.. per temporal patch of each item in its
    row, so attention stays within a frame; 0 pad) and the family's per-patch inputs
    (`Family.patch_inputs`, e.g. vision_pos [R, Lv, 2]) packed the same way. An item longer than a row,
    or items that overflow the rows, raise `PatchBudgetError`.
    """
    spatial_merge_size = cfg.vision.spatial_merge_size
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    sizes = [int(np.prod(g)) for g in grids]
    if sum(sizes) != len(pixel_values):
        raise ValueError(f"pixel_values has {len(pixel_values)} patches, image_grid_thw sums to {sum(sizes)}")
    unit = spatial_merge_size**2
    if row_len is None:
        row_len = max(unit, -(-sum(sizes) // unit) * unit)
        rows = 1 if rows is None else rows
    if row_len % unit:
        raise ValueError(f"row_len {row_len} must be a multiple of {unit}")
    rows = rows or 1
    extra = family_of(cfg).patch_inputs(grids, cfg)
    P = pixel_values.shape[1]
    out_p = np.zeros((rows, row_len, P), pixel_values.dtype)
    out_s = np.zeros((rows, row_len), np.int32)
    out_x = {k: np.zeros((rows, row_len, *v.shape[1:]), v.dtype) for k, v in extra.items()}
    r, used, seg, start = 0, 0, 0, 0
    for i, n in enumerate(sizes):
        if n > row_len:
            raise PatchBudgetError(
                f"visual item {i} (grid {tuple(grids[i].tolist())}) has {n} patches, more than the row length "
                f"{row_len}; resize it or sample fewer frames"
            )
        if used + n > row_len:
            r, used, seg = r + 1, 0, 0
        if r >= rows:
            raise PatchBudgetError(
                f"{len(sizes)} visual items ({sum(sizes)} patches) do not fit {rows} rows of {row_len}"
            )
        out_p[r, used : used + n] = pixel_values[start : start + n]
        t = int(grids[i][0])
        out_s[r, used : used + n] = seg + 1 + np.repeat(np.arange(t), n // t)
        seg += t
        for k, v in extra.items():
            out_x[k][r, used : used + n] = v[start : start + n]
        used += n
        start += n
    return {"patches": out_p, "vision_segment_ids": out_s, **out_x}


def position_ids(
    input_ids,
    attention_mask,
    image_grid_thw,
    cfg: ModelConfig,
    mode: str,
    video_grid_thw=None,
    second_per_grid_ts=None,
) -> np.ndarray:
    """[3, B, L] int32 position ids by the family's rule (`Family.position_ids`)."""
    if video_grid_thw is None:
        return family_of(cfg).position_ids(input_ids, attention_mask, image_grid_thw, cfg, mode)
    return family_of(cfg).position_ids(
        input_ids, attention_mask, image_grid_thw, cfg, mode, video_grid_thw, second_per_grid_ts
    )


def _grids(grid_thw) -> np.ndarray:
    return np.asarray(grid_thw, np.int64).reshape(-1, 3)


def build_inputs(
    cfg: ModelConfig,
    opts: ModelOptions,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    rows: int | None = None,
    row_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Model input dict (numpy) for `backbone.forward` / `prefill`; validates image- and video-token counts.

    Images and videos share the patch rows (images first); `second_per_grid_ts` [n_videos] (seconds
    per temporal patch) matters only to families whose time ids use it (Qwen2.5-VL).
    """
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    am = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if am.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {input_ids.shape}")
    out = {"input_ids": input_ids, "attention_mask": am}
    parts = []
    for kind, tok, pv, grid in (
        ("image", cfg.image_token_id, pixel_values, image_grid_thw),
        ("video", cfg.video_token_id, pixel_values_videos, video_grid_thw),
    ):
        n_tok = int(((input_ids == tok) & (am > 0)).sum())
        if pv is None:
            if n_tok:
                raise ValueError(f"input_ids hold {n_tok} <|{kind}_pad|> tokens but no {kind} pixel values were given")
            continue
        if grid is None:
            raise ValueError(f"{kind} pixel values were given without their {kind}_grid_thw")
        g = _grids(grid)
        expect = int(sum(np.prod(x) for x in g)) // cfg.vision.merge_unit
        if expect != n_tok:
            raise ValueError(
                f"{n_tok} <|{kind}_pad|> tokens in input_ids but {kind}_grid_thw implies {expect} features"
            )
        pv = np.asarray(pv, np.float32)
        if len(pv) != int(np.prod(g, axis=1).sum()):
            raise ValueError(
                f"{kind} pixel values hold {len(pv)} patches, {kind}_grid_thw sums to {np.prod(g, 1).sum()}"
            )
        parts.append((pv, g))
    if parts:
        out.update(
            pack_images(
                np.concatenate([p for p, _ in parts]),
                np.concatenate([g for _, g in parts]),
                rows=rows,
                row_len=row_len,
                cfg=cfg,
            )
        )
    img_g = _grids(image_grid_thw) if pixel_values is not None else None
    vid_g = _grids(video_grid_thw) if pixel_values_videos is not None else None
    out["positions"] = position_ids(input_ids, am, img_g, cfg, opts.position_mode, vid_g, second_per_grid_ts)
    return out
