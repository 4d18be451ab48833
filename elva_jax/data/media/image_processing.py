"""Qwen2-VL image preprocessing in numpy + PIL, numerically identical to transformers' PIL processor.

Oracle: transformers' PIL image processor of the family (Qwen2-VL's for the default geometry).
Sizes and normalisation come from the model's `PatchGeometry` (`cfg.vision.geometry`).
Per image:

1. to RGB: modes with alpha (or a ``transparency`` palette entry) are alpha-composited onto white,
   everything else goes through ``PIL.Image.convert("RGB")``; uint8 arrays [H, W], [H, W, 1|3|4] the same
   way (1 channel repeated; 4 channels: ``round(a/255 * rgb + (1 - a/255) * 255)``).
2. ``smart_resize`` to (h', w'), multiples of ``factor = patch_size * merge_size`` (28) with
   ``min_pixels <= h' w' <= max_pixels`` (approximately: see :func:`smart_resize`), then PIL bicubic.
3. ``x = float32(float64(u8) * (1/255))``, ``y = (x - mean) / std`` in float32 with the CLIP mean/std.
4. the still image is repeated to ``temporal_patch_size`` frames and cut into ``patch_size`` squares;
   patches are ordered (block_row, block_col, row_in_block, col_in_block), so every
   ``merge_size x merge_size`` window is contiguous, and each one is flattened channel-major to
   ``C * T * P * P`` values (C, T, row, col): the geometry's ``patch_dim``.

Steps 3 depend only on (channel, uint8 value), so they run as a 256-entry lookup table with exactly the
reference's float64 -> float32 rounding; the output equals transformers' bit for bit.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from elva_jax.data.errors import ImageError
from elva_jax.data.media.settings import LAMRA_MAX_PIXELS, LAMRA_MIN_PIXELS
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry

__all__ = [
    "LAMRA_MAX_PIXELS",
    "LAMRA_MIN_PIXELS",
    "MAX_ASPECT_RATIO",
    "PROCESSOR_MAX_PIXELS",
    "PROCESSOR_MIN_PIXELS",
    "load_image",
    "num_image_tokens",
    "preprocess_image",
    "preprocess_images",
    "smart_resize",
    "to_rgb_array",
]

# LAMRA_MIN_PIXELS / LAMRA_MAX_PIXELS (the default limits here) are declared with the media settings
#: transformers' Qwen2-VL defaults (``size = {"shortest_edge": 56*56, "longest_edge": 28*28*1280}``).
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = DEFAULT_GEOMETRY.factor,
    min_pixels: int = LAMRA_MIN_PIXELS,
    max_pixels: int = LAMRA_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (h', w') for an image of (height, width); same arithmetic as transformers' ``smart_resize``.

    ``h' = round(h / f) f`` (Python round: half to even), likewise w'. If ``h' w' > max_pixels``:
    ``b = sqrt(h w / max_pixels)``, ``h' = max(f, floor(h / b / f) f)``; elif ``h' w' < min_pixels``:
    ``b = sqrt(min_pixels / (h w))``, ``h' = ceil(h b / f) f``. The clamp to ``f`` (downscaling) and the
    ceil (upscaling) mean extreme aspect ratios can leave the product slightly outside the range.

    Raises:
      ImageError: a side is < 1, or ``max(h, w) / min(h, w) > 200``.
    """
    if height < 1 or width < 1:
        raise ImageError(f"image has an empty side: height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio} ({height}x{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]; alpha (incl. palette transparency) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8-valued array [H, W] or [H, W, C in {1, 3, 4}] (channels last) -> uint8 [H, W, 3]."""
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ImageError(f"integer image values must lie in [0, 255], got [{array.min()}, {array.max()}]")
        array = array.astype(np.uint8)
    else:
        raise ImageError(
            f"image arrays must hold integers in [0, 255] (uint8), got dtype {array.dtype}; "
            "float inputs are ambiguous (the reference rescales [0, 1] floats twice)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected an array [H, W] or [H, W, C] with C in (1, 3, 4), got shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any supported input -> uint8 RGB array [H, W, 3] (step 1 of the module docstring)."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"expected a PIL.Image.Image or a numpy array, got {type(image).__name__}")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully into memory (file handle closed). Unreadable files raise ImageError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from e


def load_image_bytes(data: bytes, label: str) -> Image.Image:
    """Decode an image file's bytes (as :func:`load_image` decodes the file); failures raise ImageError
    naming ``label``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {label}: {e}") from e


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [3, 256]: ``(float32(v * (1/255) in float64) - mean_c) / std_c`` computed in float32."""
    scaled = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (scaled[None, :] - m) / s


def preprocess_image(
    image: Image.Image | np.ndarray,
    *,
    min_pixels: int = LAMRA_MIN_PIXELS,
    max_pixels: int = LAMRA_MAX_PIXELS,
    geometry: PatchGeometry = DEFAULT_GEOMETRY,
) -> tuple[np.ndarray, np.ndarray]:
    """One still image -> (patches float32 [gh * gw, 3 * T * P * P], grid_thw int64 [3] = (1, gh, gw)).

    ``image``: a PIL image (any mode) or a uint8-valued array [H, W] / [H, W, 1|3|4] (channels last).
    With the defaults, ``gh * gw / 4`` is the number of ``<|image_pad|>`` tokens (:func:`num_image_tokens`).

    Raises:
      ImageError: aspect ratio > 200, an empty side, or an unsupported input.
    """
    patch_size, merge_size, temporal_patch_size = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    factor = geometry.factor
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
    # [3, H, W] float32, rescale + normalise via the exact per-value table.
    table = _normalisation_table(tuple(geometry.image_mean), tuple(geometry.image_std))
    pixels = table[np.arange(3)[:, None, None], resized.transpose(2, 0, 1)]
    grid_h, grid_w = new_h // patch_size, new_w // patch_size
    blocks = pixels.reshape(
        3, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    # (C, Bh, mh, ph, Bw, mw, pw) -> (Bh, Bw, mh, mw, C, ph, pw), then a T axis after C.
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    blocks = np.broadcast_to(blocks, (*blocks.shape[:5], temporal_patch_size, patch_size, patch_size))
    patches = np.ascontiguousarray(blocks).reshape(grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)


def preprocess_images(
    images: Sequence[Image.Image | np.ndarray],
    *,
    min_pixels: int = LAMRA_MIN_PIXELS,
    max_pixels: int = LAMRA_MAX_PIXELS,
    geometry: PatchGeometry = DEFAULT_GEOMETRY,
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (patches float32 [sum_i gh_i gw_i, patch_dim] concatenated in order, grid_thw
    int64 [n_images, 3]); an empty list gives shapes [0, patch_dim] and [0, 3]."""
    kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels, geometry=geometry)
    results = [preprocess_image(image, **kwargs) for image in images]
    if not results:
        return np.zeros((0, geometry.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    patches = np.concatenate([p for p, _ in results], axis=0)
    grids = np.stack([g for _, g in results], axis=0)
    return patches, grids


def num_image_tokens(grid_thw: np.ndarray | Sequence[int], merge_size: int = DEFAULT_GEOMETRY.merge_size) -> int:
    """``<|image_pad|>`` tokens for one image: ``t * h * w / merge_size**2``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)
