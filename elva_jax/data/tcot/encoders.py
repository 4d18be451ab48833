"""Embed-RL's two prompts of one side, as encoders for the pipeline and the RL trainer.

Shared by the Embed-RL trainer (`elva_jax.rl.embed_rl_trainer`: the reasoner's rollouts, the frozen
embedder's rows) and evaluation with T-CoTs (`elva_jax.eval.cot`), so both write the same rows:

* reasoner: :func:`elva_jax.data.prompts.tcot_reasoner_prompt` of the side (open assistant turn);
* embedder: :func:`elva_jax.data.prompts.tcot_embed_prompt` of the side and its CoT (assistant ``<emb>``).

A side is ``{"text", "image", "instruction"}``, optionally ``"video"`` and ``"extra_images"`` (paths
of evidence crops / key frames appended after the side's own image; evaluation only). Image count of a
side = its image (0 or 1) + its extra images; video count = 0 or 1.
"""

from __future__ import annotations

from collections.abc import Callable

from elva_jax.data.encoding import video_arrays
from elva_jax.data.prompts import Prompt, tcot_embed_prompt, tcot_reasoner_prompt

__all__ = ["PromptFnEncoder", "embedder_encoder", "embedder_prompt", "reasoner_encoder", "reasoner_prompt"]


def side_counts(side: dict) -> tuple[int, int]:
    """(images, videos) of a side: its image, then its ``extra_images``; its video."""
    n_img = int(side.get("image") is not None) + len(side.get("extra_images") or ())
    return n_img, int(side.get("video") is not None)


def reasoner_prompt(side: dict, request: str) -> Prompt:
    n, nv = side_counts(side)
    return tcot_reasoner_prompt(side.get("text"), n, side.get("instruction"), request=request, n_videos=nv)


def embedder_prompt(side: dict, cot: str, request: str) -> Prompt:
    n, nv = side_counts(side)
    return tcot_embed_prompt(side.get("text"), n, side.get("instruction"), cot=cot, request=request, n_videos=nv)


class PromptFnEncoder:
    """The pipeline's encoder protocol ``encode(side, pixel_values, image_grid_thw, max_len, videos=())
    -> (row, truncated)`` for a prompt built by ``make_prompt(side)``.

    ``videos=False`` refuses video sides (the RL trainer's prompt batches carry no video arrays);
    ``videos=True`` adds the pipeline's video arrays to the row (``encoding.PromptEncoder``'s layout)."""

    def __init__(self, tokenizer, make_prompt: Callable[[dict], Prompt], *, videos: bool = False):
        self.tokenizer, self.make_prompt, self.videos = tokenizer, make_prompt, videos

    def encode(self, side: dict, pixel_values, image_grid_thw, max_len: int, *, videos=()) -> tuple[dict, bool]:
        if not self.videos and (side.get("video") is not None or videos):
            raise NotImplementedError("Embed-RL rollouts of video sides are not implemented yet")
        enc = self.tokenizer.encode_prompt(
            self.make_prompt(side), image_grid_thw, max_length=max_len, **({"videos": videos} if videos else {})
        )
        row = {"input_ids": enc["input_ids"], "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if self.videos:
            row.update(video_arrays(videos))
        return row, enc["truncated"]


def reasoner_encoder(tokenizer, request: str, *, videos: bool = False) -> PromptFnEncoder:
    """The reasoner's generation prompts (`tcot_reasoner_prompt` with ``request``)."""
    return PromptFnEncoder(tokenizer, lambda s: reasoner_prompt(s, request), videos=videos)


def embedder_encoder(tokenizer, request: str, cot: str | None = None, *, videos: bool = False) -> PromptFnEncoder:
    """The embedder's rows (`tcot_embed_prompt`): side + ``cot`` (None: each side's own ``"cot"``) +
    ``request``, assistant ``<emb>``."""
    if cot is None:
        return PromptFnEncoder(tokenizer, lambda s: embedder_prompt(s, s["cot"], request), videos=videos)
    return PromptFnEncoder(tokenizer, lambda s: embedder_prompt(s, cot, request), videos=videos)
