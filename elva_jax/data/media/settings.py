"""The media settings, declared once: image pixel limits, the patch row, video sampling and sizing.

:class:`MediaSettings` is the media part of the run schema's ``data`` section
(`elva_jax.schema.data.DataSection` inherits it, so the keys stay ``data.min_pixels``, ``data.video_fps``
...). Every config that preprocesses media holds one (`elva_jax.data.pipeline.config.PipelineConfig`,
`elva_jax.eval.embed_config.EmbedConfig`, `elva_jax.eval.cot.CoTConfig`) or takes one (the RL trainers),
read off a run config with ``project(MediaSettings, cfg.data)`` (`elva_jax.schema.project`).

The image defaults are LamRA's published numbers (pixel counts, the same for every family; they are not
derived from the model's patch geometry); the video defaults are this package's own (below).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LAMRA_MAX_PIXELS", "LAMRA_MIN_PIXELS", "LAMRA_PATCH_ROW_LEN", "MediaSettings"]

#: LamRA's image pixel limits: 4 .. 300 visual tokens of 28 x 28 pixels (Qwen2-VL: 14-pixel patches, 2 x 2
#: merge). Kept as pixel counts for every family (Qwen3-VL's 32 x 32-pixel tokens: about 3 .. 230 tokens)
LAMRA_MIN_PIXELS = 4 * 28 * 28
LAMRA_MAX_PIXELS = 300 * 28 * 28
#: LamRA's patch row: at most 300 visual tokens of an image = 300 * 2 * 2 = 1200 patches before the merge
LAMRA_PATCH_ROW_LEN = 300 * 2 * 2


@dataclasses.dataclass(frozen=True)
class MediaSettings:
    """How images and videos become patches (`elva_jax.data.media`), and the patch row they must fit.

    patch_row_len: patches per patch row of a batch (an image or a video must fit one row).
    min_pixels / max_pixels: the image processor's pixel limits (`image_processing.smart_resize`).
    video_*: video sides (`elva_jax.data.media.video.load_video`): frames sampled per second (0: every
    frame), frame-count bounds, pixel limits per frame (Qwen2-VL / Qwen2.5-VL) or over all frames
    (Qwen3-VL; 0: the family's video-processor default).
    """

    patch_row_len: int = LAMRA_PATCH_ROW_LEN
    min_pixels: int = LAMRA_MIN_PIXELS
    max_pixels: int = LAMRA_MAX_PIXELS
    # Not from a paper: chosen so a clip fits LamRA's patch row (8 frames of <= 64 * 28 * 28 px = 4 temporal
    # patches of <= 256 patches); a longer video is resampled with fewer frames to fit the row
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_pixels: int = 4 * 28 * 28
    video_max_pixels: int = 64 * 28 * 28

    def video(self) -> dict[str, Any]:
        """The ``video_*`` settings {name: value}, in declaration order (as cache fingerprints record them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MediaSettings) if f.name.startswith("video_")}

    def video_sampling(self) -> dict[str, Any]:
        """`load_video`'s sampling and sizing arguments: fps 0 -> None (every frame), a pixel limit 0 -> None
        (the family's video-processor default)."""
        return {
            "fps": self.video_fps or None,
            "min_frames": self.video_min_frames,
            "max_frames": self.video_max_frames,
            "min_pixels": self.video_min_pixels or None,
            "max_pixels": self.video_max_pixels or None,
        }
