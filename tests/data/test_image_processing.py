"""Parity of elva_jax.data.media.image_processing with transformers' Qwen2VLImageProcessorPil (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from elva_jax.data.errors import ImageError
from elva_jax.data.media.image_processing import (
    LAMRA_MAX_PIXELS,
    LAMRA_MIN_PIXELS,
    PROCESSOR_MAX_PIXELS,
    PROCESSOR_MIN_PIXELS,
    num_image_tokens,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

qwen2vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
ref_smart_resize = qwen2vl.smart_resize

SIZES = [
    (1, 1),
    (5, 7),
    (28, 28),
    (56, 56),
    (42, 70),  # round(1.5) = 2, round(2.5) = 2: Python's half-to-even rounding
    (57, 113),
    (30, 900),  # wide
    (900, 30),  # tall
    (1, 200),  # aspect ratio exactly 200 is allowed
    (224, 224),
    (333, 1999),  # downscaled by max_pixels, wide
    (1000, 700),  # downscaled by max_pixels
]


@pytest.fixture(scope="module")
def lamra_ref():
    return qwen2vl.Qwen2VLImageProcessorPil(min_pixels=LAMRA_MIN_PIXELS, max_pixels=LAMRA_MAX_PIXELS)


@pytest.fixture(scope="module")
def default_ref():
    return qwen2vl.Qwen2VLImageProcessorPil(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)


def _content(rng: np.random.Generator, h: int, w: int, channels: int, kind: str) -> np.ndarray:
    if kind == "noise":
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([yy, xx, (yy + xx) / 2, 1 - yy][:channels], axis=-1)
    return np.clip(base * 255 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _check(ref, image, ref_image=None, **limits):
    out = ref(ref_image if ref_image is not None else image)
    want, want_grid = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])
    got, grid = preprocess_image(image, **limits)
    assert got.dtype == np.float32 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(grid, want_grid[0])
    np.testing.assert_array_equal(got, want)  # bit-identical (max abs diff 0)
    assert got.shape == (int(np.prod(grid)), 1176)
    return got, grid


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "P+transparency", "1", "CMYK"])
def test_pil_parity(lamra_ref, size, mode):
    h, w = size
    rng = np.random.default_rng(h * 7919 + w)
    kind = "noise" if (h + w) % 2 else "smooth"
    if mode in ("RGBA", "LA"):
        image = Image.fromarray(_content(rng, h, w, 4, kind), "RGBA")
        image = image if mode == "RGBA" else image.convert("LA")
    else:
        image = Image.fromarray(_content(rng, h, w, 3, kind), "RGB")
        if mode == "P+transparency":
            image = image.convert("P")
            image.info["transparency"] = int(np.asarray(image)[0, 0])
        else:
            image = image.convert(mode)
    _check(lamra_ref, image)


@pytest.mark.parametrize("size", [(5, 7), (30, 900), (57, 113), (1000, 700)], ids=str)
@pytest.mark.parametrize("layout", ["HWC", "HW1", "HW4", "HW", "int32"])
def test_numpy_parity(lamra_ref, size, layout):
    h, w = size
    rng = np.random.default_rng(h + w)
    channels = {"HWC": 3, "HW1": 1, "HW4": 4, "HW": 1, "int32": 3}[layout]
    array = _content(rng, h, w, channels, "noise")
    if layout == "HW":  # transformers cannot take 2-D arrays: compare with the [H, W, 1] equivalent
        _check(lamra_ref, array[:, :, 0], ref_image=array)
    elif layout == "int32":
        _check(lamra_ref, array.astype(np.int32))
    else:
        _check(lamra_ref, array)


def test_default_limits_parity(default_ref):
    rng = np.random.default_rng(0)
    for h, w in [(600, 800), (20, 20), (31, 1500)]:
        image = Image.fromarray(_content(rng, h, w, 3, "smooth"))
        _check(default_ref, image, min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)


def test_batch_parity(lamra_ref):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(_content(rng, h, w, 3, "noise")) for h, w in [(40, 90), (300, 300), (9, 900)]]
    out = lamra_ref(images)
    patches, grids = preprocess_images(images)
    np.testing.assert_array_equal(patches, np.asarray(out["pixel_values"]))
    np.testing.assert_array_equal(grids, np.asarray(out["image_grid_thw"]))
    assert grids.shape == (3, 3) and patches.shape[0] == int(np.prod(grids, axis=1).sum())
    empty_patches, empty_grids = preprocess_images([])
    assert empty_patches.shape == (0, 1176) and empty_grids.shape == (0, 3)


def test_smart_resize_matches_reference():
    sizes = [(h, w) for h in (1, 13, 14, 27, 28, 42, 70, 97, 500, 1333) for w in (1, 3, 28, 41, 210, 777, 4000)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in [(LAMRA_MIN_PIXELS, LAMRA_MAX_PIXELS), (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)]:
            assert smart_resize(h, w, 28, lo, hi) == ref_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_layout_and_token_count():
    """Independent of the oracle: merge windows are contiguous and channel-major with 2 equal frames."""
    image = np.zeros((56, 56, 3), np.uint8)
    image[:28, 28:] = 255  # top-right 28x28 block (the second merge window) is white
    patches, grid = preprocess_image(image)
    assert tuple(grid) == (1, 4, 4) and num_image_tokens(grid) == 4
    white = patches.reshape(16, 3, 2, 14, 14).max(axis=(1, 2, 3, 4)) > 1.5
    np.testing.assert_array_equal(np.flatnonzero(white), [4, 5, 6, 7])
    frames = patches.reshape(16, 3, 2, 196)
    np.testing.assert_array_equal(frames[:, :, 0], frames[:, :, 1])


@pytest.mark.parametrize("shape", [(1, 201, 3), (201, 1, 3), (2, 500, 3)])
def test_aspect_ratio_error(shape):
    array = np.zeros(shape, np.uint8)
    for image in (array, Image.fromarray(array)):
        with pytest.raises(ImageError, match="aspect ratio"):
            preprocess_image(image)
    with pytest.raises(ValueError):  # ImageError is a ValueError
        smart_resize(shape[0], shape[1])


def test_bad_inputs():
    with pytest.raises(ImageError, match="dtype"):
        preprocess_image(np.zeros((30, 30, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        preprocess_image(np.zeros((30, 30, 2), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 255\]"):
        preprocess_image(np.full((30, 30, 3), 300, np.int32))
    with pytest.raises(ImageError):
        preprocess_image("not an image")
