"""Host-side (numpy) assembly of model inputs with static shapes.

From transformers-style arrays (input_ids, attention_mask, pixel_values [N, 1176] concatenated over
images in batch order, image_grid_thw [n_images, 3]) build the dict that `backbone.forward` takes:
position ids for the chosen mode, and image patches packed whole into R rows of Lv patches
(a fixed patch budget, so a run compiles a handful of programs).
"""

from __future__ import annotations

import numpy as np

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
    """Pack images (in order) into `rows` x `row_len` patch slots; each image stays whole in one row.

    Greedy first-fit in order (so the merged features keep the image order when read row-major after
    dropping padding). Defaults: one row exactly as long as all patches (rounded to the merge unit).
    Returns patches [R, Lv, P], vision_segment_ids [R, Lv] (1.. per image in its row, 0 pad) and the
    family's per-patch inputs (`Family.patch_inputs`, e.g. vision_pos [R, Lv, 2]) packed the same way.
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
            raise ValueError(f"image {i} has {n} patches, more than the row length {row_len}")
        if used + n > row_len:
            r, used, seg = r + 1, 0, 0
        if r >= rows:
            raise ValueError(f"{len(sizes)} images ({sum(sizes)} patches) do not fit {rows} rows of {row_len}")
        seg += 1
        out_p[r, used : used + n] = pixel_values[start : start + n]
        out_s[r, used : used + n] = seg
        for k, v in extra.items():
            out_x[k][r, used : used + n] = v[start : start + n]
        used += n
        start += n
    return {"patches": out_p, "vision_segment_ids": out_s, **out_x}


def position_ids(input_ids, attention_mask, image_grid_thw, cfg: ModelConfig, mode: str) -> np.ndarray:
    """[3, B, L] int32 position ids by the family's rule (`Family.position_ids`)."""
    return family_of(cfg).position_ids(input_ids, attention_mask, image_grid_thw, cfg, mode)


def build_inputs(
    cfg: ModelConfig,
    opts: ModelOptions,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    rows: int | None = None,
    row_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Model input dict (numpy) for `backbone.forward` / `prefill`; validates image-token counts."""
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    am = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if am.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {input_ids.shape}")
    n_img_tok = int(((input_ids == cfg.image_token_id) & (am > 0)).sum())
    out = {"input_ids": input_ids, "attention_mask": am}
    if pixel_values is not None:
        grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        expect = int(sum(np.prod(g) for g in grids)) // cfg.vision.merge_unit
        if expect != n_img_tok:
            raise ValueError(
                f"{n_img_tok} <|image_pad|> tokens in input_ids but image_grid_thw implies {expect} image features"
            )
        out.update(
            pack_images(
                np.asarray(pixel_values, np.float32),
                grids,
                rows=rows,
                row_len=row_len,
                cfg=cfg,
            )
        )
    elif n_img_tok:
        raise ValueError(f"input_ids hold {n_img_tok} <|image_pad|> tokens but no pixel_values were given")
    out["positions"] = position_ids(
        input_ids, am, image_grid_thw if pixel_values is not None else None, cfg, opts.position_mode
    )
    return out
