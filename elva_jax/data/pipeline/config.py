"""The pipeline's knobs (:class:`PipelineConfig`), its image-failure policy and its counters."""

from __future__ import annotations

import dataclasses

from elva_jax.data.media.settings import MediaSettings
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry

__all__ = ["ImagePolicy", "PipelineConfig", "PipelineStats"]


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """What a missing/unreadable image does: ``"fail"`` raises (message names the path); ``"skip"``
    drops the whole record, counts it, and raises SkippedFractionError once ``skipped > max_skip_fraction
    * seen`` with at least ``min_seen`` records seen."""

    mode: str = "fail"
    max_skip_fraction: float = 0.01
    min_seen: int = 100

    def __post_init__(self):
        if self.mode not in ("fail", "skip"):
            raise ValueError(f"image policy mode must be 'fail' or 'skip', got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static-shape and ordering knobs.

    batch_size: queries per micro-batch (b); micro_batches: A. seq_buckets: allowed padded lengths
    (longer rows are truncated by the encoder to the largest). patch_budget: (R, Lv) for every group
    (None: text-only data, no patch arrays); cand_patch_budget overrides it for candidates (None:
    same). num_negatives: k hard negatives per query (contrastive/NLI; 0 = none). num_epochs: None repeats forever.
    process_index/process_count: None -> jax.process_index()/process_count().
    mp_workers: > 0 enables grain ``mp_prefetch`` with that many worker processes.
    pad_token_id: the id of padding positions (masked): the tokenizer's ``pad_token_id``, which every run's
    pipeline passes (0 where none is given: data-only tools and tests).
    media: pixel limits and video sampling / sizing (the run's ``data.*``; its ``patch_row_len`` is not read
    here: the patch rows are ``patch_budget``). A video over a patch row is resampled with fewer frames.
    """

    batch_size: int = 4
    micro_batches: int = 1
    seq_buckets: tuple[int, ...] = (64, 128, 256)
    patch_budget: tuple[int, int] | None = (4, 256)
    cand_patch_budget: tuple[int, int] | None = None
    num_negatives: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    process_index: int | None = None
    process_count: int | None = None
    image_policy: ImagePolicy = ImagePolicy()
    mp_workers: int = 0
    drop_remainder: bool = True
    pad_token_id: int = 0
    position_mode: str = "mrope"
    media: MediaSettings = MediaSettings()
    geometry: PatchGeometry = DEFAULT_GEOMETRY  # the model's patches (`cfg.vision.geometry`)

    @property
    def records_per_batch(self) -> int:
        return self.batch_size * self.micro_batches


@dataclasses.dataclass
class PipelineStats:
    """Counters aggregated in the consuming process (also across mp_prefetch workers).

    seen: records read; skipped: records dropped for a bad image; truncated: texts cut to the largest
    bucket; batches / examples: emitted; images / videos: images / videos in emitted batches; skipped_paths:
    last few offending image or video paths."""

    seen: int = 0
    skipped: int = 0
    truncated: int = 0
    batches: int = 0
    examples: int = 0
    images: int = 0
    videos: int = 0
    skipped_paths: list[str] = dataclasses.field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0
