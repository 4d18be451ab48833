"""Model rows: a pipeline side (:class:`PromptEncoder`, the pipeline's encoder protocol) or a one-off
example (:func:`encode_example`) -> one row of token ids and pixels, and rows -> padded arrays for
:func:`elva_jax.model.inputs.build_inputs` (:func:`collate`). Tokenization and its truncation rule are
:mod:`elva_jax.data.tokenize`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elva_jax.data.media import image_processing as ip
from elva_jax.data.prompts import (
    DEFAULT_EMBED_INSTRUCTION,
    Prompt,
    elva_prompt,
    instruct_prompt,
    lamra_prompt,
    raw_prompt,
)
from elva_jax.data.tokenize import Tokenizer

__all__ = ["TEMPLATES", "PromptEncoder", "collate", "encode_example", "video_arrays"]

#: prompt templates of :class:`PromptEncoder`, one per embedding convention (see elva_jax.data.prompts)
TEMPLATES = ("eol", "ret", "instruct_last")


class PromptEncoder:
    """Adapter to :mod:`elva_jax.data.pipeline`'s encoder protocol
    ``encode(side, pixel_values, image_grid_thw, max_len) -> (row, truncated)``.

    ``side`` = ``{"text", "image", "instruction"}`` (image: a path or None; its pixels come preprocessed).
    template "eol" (LamRA, assistant ``<emb>.``), "ret" (ELVA; ``generation`` opens the assistant turn,
    else the assistant turn is ``[RET]``) or "instruct_last" (Qwen3-VL-Embedding: the side's instruction,
    else ``default_instruction``, as the system turn; the generation prompt closes the row). Rows are
    tokenized in one pass, so they equal transformers' tokenization; over-long rows follow the module's
    truncation rule with ``max_length = max_len``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str = "eol",
        *,
        generation: bool = False,
        default_instruction: str = DEFAULT_EMBED_INSTRUCTION,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.tokenizer, self.template, self.generation = tokenizer, template, generation
        self.default_instruction = default_instruction

    def prompt(self, side: dict) -> Prompt:
        n = int(side.get("image") is not None)
        nv = int(side.get("video") is not None)
        if self.template == "eol":
            return lamra_prompt(side.get("text"), n, side.get("instruction"), n_videos=nv)
        if self.template == "instruct_last":
            return instruct_prompt(
                side.get("text"),
                n,
                side.get("instruction"),
                default_instruction=self.default_instruction,
                n_videos=nv,
            )
        return elva_prompt(side.get("text"), n, side.get("instruction"), generation=self.generation, n_videos=nv)

    def encode(self, side: dict, pixel_values, image_grid_thw, max_len: int, *, videos=()) -> tuple[dict, bool]:
        """``videos``: the side's processed video (`elva_jax.data.media.video.VideoInput`, one when ``side["video"]``
        is set). The row also carries pixel_values_videos / video_grid_thw / second_per_grid_ts (None
        without a video)."""
        enc = self.tokenizer.encode_prompt(self.prompt(side), image_grid_thw, max_length=max_len, videos=videos)
        row = {"input_ids": enc["input_ids"], "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        row.update(video_arrays(videos))
        return row, enc["truncated"]


def video_arrays(videos: Sequence[Any]) -> dict:
    """pixel_values_videos [Nv, patch_dim], video_grid_thw [n, 3], second_per_grid_ts [n] (None when none)."""
    if not videos:
        return {"pixel_values_videos": None, "video_grid_thw": None, "second_per_grid_ts": None}
    return {
        "pixel_values_videos": np.concatenate([v.patches for v in videos]).astype(np.float32),
        "video_grid_thw": np.stack([np.asarray(v.grid_thw, np.int64) for v in videos]),
        "second_per_grid_ts": np.asarray([v.second_per_grid_t for v in videos], np.float32),
    }


def _as_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path)) or not isinstance(images, (list, tuple)):
        return [images]
    return list(images)


def encode_example(
    tokenizer: Tokenizer,
    text: str | None = None,
    images=None,
    *,
    template: str = "eol",
    instruction: str | None = None,
    summary: str | None = None,
    generation: bool = False,
    with_assistant: bool = True,
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    max_text_tokens: int | None = None,
) -> dict[str, Any]:
    """Text and/or images (PIL images, uint8 arrays or paths; one or a list) -> one model row.

    template: "eol" (:func:`~elva_jax.data.prompts.lamra_prompt`, ``with_assistant``), "ret"
    (:func:`~elva_jax.data.prompts.elva_prompt`, ``summary`` / ``generation``), "instruct_last"
    (:func:`~elva_jax.data.prompts.instruct_prompt`, ``default_instruction``) or "raw" (images then the
    text, no chat wrapper). Images go through :func:`elva_jax.data.media.image_processing.preprocess_images`
    (LamRA pixel limits unless given). Returns ``input_ids`` int32 [L], ``pixel_values`` float32
    [n_patches, patch_dim], ``image_grid_thw`` int64 [n_images, 3] (empty arrays for text rows),
    ``n_image_tokens``, ``n_text_tokens``, ``truncated``.
    """
    imgs = [ip.load_image(x) if isinstance(x, (str, Path)) else x for x in _as_images(images)]
    limits = {
        "min_pixels": ip.LAMRA_MIN_PIXELS if min_pixels is None else min_pixels,
        "max_pixels": ip.LAMRA_MAX_PIXELS if max_pixels is None else max_pixels,
        "geometry": tokenizer.geometry,
    }
    pv, grid = ip.preprocess_images(imgs, **limits)
    if template == "eol":
        prompt = lamra_prompt(text, len(imgs), instruction, with_assistant=with_assistant)
    elif template == "ret":
        prompt = elva_prompt(text, len(imgs), instruction, summary=summary, generation=generation)
    elif template == "instruct_last":
        prompt = instruct_prompt(text, len(imgs), instruction, default_instruction=default_instruction)
    elif template == "raw":
        if instruction:
            raise ValueError("the raw template takes no instruction")
        prompt = raw_prompt(text, len(imgs))
    else:
        raise ValueError(f"unknown template {template!r}; choose eol, ret, instruct_last or raw")
    out = tokenizer.encode_prompt(prompt, grid, max_length=max_length, max_text_tokens=max_text_tokens)
    out.update(pixel_values=pv.astype(np.float32), image_grid_thw=grid.astype(np.int64))
    return out


def _has_images(e: dict) -> bool:
    return e.get("image_grid_thw") is not None and np.size(e["image_grid_thw"]) > 0


def collate(
    examples: Sequence[dict],
    pad_id: int,
    pad_side: str = "right",
    length_bucket: int | Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Encoded rows -> padded arrays for :func:`elva_jax.model.inputs.build_inputs`.

    ``input_ids`` / ``attention_mask`` int32 [B, L], where L is the longest row rounded up to a multiple
    of ``length_bucket`` (an int) or the smallest of the allowed lengths (a sequence; a longer row raises).
    ``pixel_values`` float32 [N, patch_dim] and ``image_grid_thw`` int64 [n_images, 3] (images in row order)
    are present only when some row has an image; likewise ``pixel_values_videos`` / ``video_grid_thw`` /
    ``second_per_grid_ts`` [n_videos] for rows with videos (keys of the same names, one entry per video),
    so ``build_inputs(cfg, opts, **batch)`` works. ``pad_id``: the tokenizer's ``pad_token_id``.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    n = max(len(e["input_ids"]) for e in examples)
    if length_bucket is None:
        L = n
    elif isinstance(length_bucket, int):
        L = -(-n // length_bucket) * length_bucket
    else:
        fits = [b for b in sorted(length_bucket) if b >= n]
        if not fits:
            raise ValueError(f"row of {n} tokens exceeds the largest length bucket {max(length_bucket)}")
        L = fits[0]
    ids = np.full((len(examples), L), pad_id, np.int32)
    am = np.zeros((len(examples), L), np.int32)
    for i, e in enumerate(examples):
        row = np.asarray(e["input_ids"], np.int32)
        sl = slice(0, len(row)) if pad_side == "right" else slice(L - len(row), L)
        ids[i, sl], am[i, sl] = row, 1
    out = {"input_ids": ids, "attention_mask": am}
    grids = [np.asarray(e["image_grid_thw"], np.int64).reshape(-1, 3) for e in examples if _has_images(e)]
    if grids:
        pvs = [
            np.asarray(e["pixel_values"], np.float32).reshape(-1, np.shape(e["pixel_values"])[-1])
            for e in examples
            if _has_images(e)
        ]
        out["pixel_values"] = np.concatenate(pvs)
        out["image_grid_thw"] = np.concatenate(grids)
    with_video = [e for e in examples if e.get("video_grid_thw") is not None and np.size(e["video_grid_thw"]) > 0]
    if with_video:
        g = [np.asarray(e["video_grid_thw"], np.int64).reshape(-1, 3) for e in with_video]
        out["pixel_values_videos"] = np.concatenate(
            [
                np.asarray(e["pixel_values_videos"], np.float32).reshape(-1, np.shape(e["pixel_values_videos"])[-1])
                for e in with_video
            ]
        )
        out["video_grid_thw"] = np.concatenate(g)
        spg = [
            np.asarray(e.get("second_per_grid_ts", np.ones(len(x))), np.float32).reshape(-1)
            for e, x in zip(with_video, g, strict=True)
        ]
        out["second_per_grid_ts"] = np.concatenate(spg)
    return out
