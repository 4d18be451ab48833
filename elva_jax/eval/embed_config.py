"""How records become embeddings: :class:`EmbedConfig`, whose every field enters the embedding cache's
fingerprint (:mod:`elva_jax.eval.embed_cache`); the conventions themselves are described in
:mod:`elva_jax.eval.embed`."""

from __future__ import annotations

import dataclasses
from typing import Any

from elva_jax.data.media.settings import LAMRA_MAX_PIXELS, LAMRA_MIN_PIXELS, MediaSettings
from elva_jax.data.prompts import DEFAULT_EMBED_INSTRUCTION
from elva_jax.model.sampler import SamplerConfig
from elva_jax.schema import EMBED_MODES

__all__ = ["EmbedConfig"]


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How records become embeddings (everything here enters the cache fingerprint).

    mode: "eol" | "ret" | "instruct_last". batch_size: records per batch (divisible by the mesh's batch
    devices).
    seq_buckets: padded lengths (longer rows are truncated to the largest by the prompt encoder).
    patch_rows: image patch rows per batch (0 = batch_size), each of ``media.patch_row_len`` patches.
    media: pixel limits, patch row and video sampling (the run's ``data.*``; LamRA's limits by default).
    part_size: records per cache part. "ret" only: summary_tokens (max new tokens before a forced
    [RET]), sampling "greedy" (top_k=1) or "sample" (temperature / top_k / top_p, key from ``seed``).
    "instruct_last" only: default_instruction, the system turn of records without an instruction.
    tcot_request: non-empty = Embed-RL's embedder layout (the Embedder then needs a ``cot`` generator,
    `elva_jax.eval.cot`): each side + its T-CoT + this summarise request, assistant ``<emb>``, the
    L2-normalised hidden state at ``<emb>`` (`elva_jax.data.tcot.encoders.embedder_prompt`, as the frozen
    embedder of `elva_jax.rl.embed_rl_trainer`); ``mode`` is then not used.
    """

    mode: str = "eol"
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (128, 256, 512)
    patch_rows: int = 0
    part_size: int = 1024
    summary_tokens: int = 32
    sampling: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION
    media: MediaSettings = MediaSettings()
    tcot_request: str = ""

    def __post_init__(self):
        if self.mode not in EMBED_MODES:
            raise ValueError(f"mode must be one of {EMBED_MODES}, got {self.mode!r}")
        if self.sampling not in ("greedy", "sample"):
            raise ValueError(f"sampling must be 'greedy' or 'sample', got {self.sampling!r}")
        if self.batch_size < 1 or self.part_size < 1 or self.summary_tokens < 1:
            raise ValueError("batch_size, part_size and summary_tokens must be >= 1")

    def sampler_config(self, cache_dtype: str = "float32") -> SamplerConfig:
        if self.sampling == "greedy":
            return SamplerConfig(max_new_tokens=self.summary_tokens, top_k=1, cache_dtype=cache_dtype)
        return SamplerConfig(
            max_new_tokens=self.summary_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            cache_dtype=cache_dtype,
        )

    def describe(self) -> dict:
        """The settings that define an embedding (results.json and the cache fingerprint)."""
        d: dict[str, Any] = {"mode": self.mode, "max_length": max(self.seq_buckets), "part_size": self.part_size}
        m = self.media  # its patch_row_len is a shape, not a setting of the embedding
        if (m.min_pixels, m.max_pixels) != (LAMRA_MIN_PIXELS, LAMRA_MAX_PIXELS):  # (keeps older fingerprints)
            d["pixels"] = [m.min_pixels, m.max_pixels]
        if m.video() != MediaSettings().video():  # (keeps older fingerprints)
            d["video"] = m.video()
        d.update(self._convention())
        return d

    def _convention(self) -> dict:
        """The embedding convention's part of :meth:`describe`: which hidden state is the embedding (and the
        convention's own settings). The one place here that branches over the conventions."""
        if self.tcot_request:
            return {
                "mode": "tcot",
                "embedding": "Embed-RL: side + its T-CoT + summarise request, hidden state at <emb>, L2-normalised",
                "tcot_request": self.tcot_request,
            }
        if self.mode == "eol":
            return {"embedding": "LamRA EOL: hidden state before <emb>, L2-normalised"}
        if self.mode == "instruct_last":
            return {
                "embedding": "Qwen3-VL-Embedding: instruction as the system turn, generation prompt, "
                "hidden state of the last real token, L2-normalised",
                "default_instruction": self.default_instruction,
            }
        summary: dict[str, Any] = {"max_new_tokens": self.summary_tokens, "sampling": self.sampling}
        if self.sampling == "greedy":
            summary["rule"] = "greedy (top_k=1)"
        else:
            summary.update(
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                batch_size=self.batch_size,  # the key is per batch, so the grouping matters
            )
        return {
            "embedding": "ELVA generative: hidden state at [RET] after a generated summary, L2-normalised",
            "summary": summary,
        }
