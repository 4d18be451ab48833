"""Per-record encoding in Grain workers: a record's images and videos loaded and preprocessed, its sides
tokenized by the encoder, and the image policy applied (``"skip"``: the record is dropped and counted; in
the elastic flow a substitute from a later global batch takes its place)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np
from etils import epath

from elva_jax.data.errors import ImageError, SkippedFractionError
from elva_jax.data.media.image_processing import load_image, load_image_bytes, preprocess_images
from elva_jax.data.media.video import VideoError, VideoInput, load_video
from elva_jax.data.pipeline.config import PipelineConfig

__all__ = ["EncodeRecord", "EncodedWithSubstitutes", "not_skipped"]


class EncodeRecord:
    """grain map: record -> encoded record (or a skip marker); keeps per-worker skip counters."""

    def __init__(self, encoder, cfg: PipelineConfig, group_keys: tuple[str, ...]):
        self.encoder, self.cfg, self.group_keys = encoder, cfg, group_keys
        self.seen = self.skipped = 0
        self.pending: list[str] = []  # skipped paths not yet reported downstream

    def _load(self, side: dict | str):
        """The side's image: from ``image_bytes`` when the side carries them (prepared sources; ``where``
        names the shard and record), else from the file ``image`` (local or an epath URL; a bare path
        string is such a file)."""
        side = {"image": side} if isinstance(side, str) else side
        path = side["image"]
        try:
            if "image_bytes" in side:
                if side["image_bytes"] is None:
                    raise ImageError(f"image {path} was missing when {side.get('where')} was prepared")
                image = load_image_bytes(side["image_bytes"], f"{path} (in {side.get('where')})")
            elif "://" in path:
                p = epath.Path(path)
                if not p.exists():
                    raise ImageError(f"image file not found: {path}")
                image = load_image_bytes(p.read_bytes(), path)
            else:
                if not Path(path).is_file():
                    raise ImageError(f"image file not found: {path}")
                image = load_image(path)
            c = self.cfg
            m = c.media
            pv, grid = preprocess_images([image], min_pixels=m.min_pixels, max_pixels=m.max_pixels, geometry=c.geometry)
            rows = [b[1] for b in (c.patch_budget, c.cand_patch_budget) if b is not None]
            if rows and len(pv) > max(rows):
                raise ImageError(
                    f"image {path} needs {len(pv)} patches, more than a row of {max(rows)} "
                    "(lower data.max_pixels or raise data.patch_row_len)"
                )
            return pv, grid
        except ImageError as e:
            if self.cfg.image_policy.mode == "fail":
                raise ImageError(f"{e} (image policy 'fail'; path {path})") from e
            return None

    def _row_len(self, key: str) -> int | None:
        """Patch row length of the group that ``key``'s sides go to (None: text-only pipeline)."""
        c = self.cfg
        budget = c.cand_patch_budget or c.patch_budget if key == "cands" else c.patch_budget
        return None if budget is None else budget[1]

    def _load_video(self, side: dict, key: str, rid) -> VideoInput | None:
        """The side's ``video`` (file or frame folder; ``video_fps``: the folder's rate) decoded, sampled
        and patched (`elva_jax.data.media.video.load_video`, the model's geometry, the config's video settings, at
        most a patch row of patches: longer videos are resampled with fewer frames). None when the skip
        policy drops it; "fail" raises VideoError naming the file and the record."""
        c, path = self.cfg, side["video"]
        row_len = self._row_len(key)
        if row_len is None:
            raise ValueError(
                f"record {rid!r} has a video ({path}) but this pipeline has no patch budget (text-only data)"
            )
        data = side.get("video_data")  # prepared sources: the container's bytes or the frames' bytes
        try:
            if "video_data" in side:
                if data is None:
                    raise VideoError(f"video {path} was missing when {side.get('where')} was prepared")
            elif not (epath.Path(path).exists() if "://" in str(path) else Path(path).exists()):
                raise VideoError(f"video file not found: {path}")
            return load_video(
                path,
                c.geometry,
                **c.media.video_sampling(),
                max_patches=row_len,
                folder_fps=side.get("video_fps"),
                data=data,
            )
        except VideoError as e:
            if c.image_policy.mode == "fail":
                raise VideoError(f"{e} (record {rid!r}; image policy 'fail'; path {path})") from e
            return None

    def _encode_side(self, side: dict, key: str = "item", rid=None) -> tuple[dict | None, bool, str | None]:
        pv, grid = None, None
        if side["image"] is not None:
            loaded = self._load(side)
            if loaded is None:
                return None, False, side["image"]
            pv, grid = loaded
        for path in side.get("extra_images") or ():  # evidence crops / key frames (elva_jax.eval.cot), in order
            loaded = self._load(str(path))
            if loaded is None:
                return None, False, str(path)
            pv = loaded[0] if pv is None else np.concatenate([pv, loaded[0]])
            grid = loaded[1] if grid is None else np.concatenate([np.asarray(grid), np.asarray(loaded[1])])
        if side.get("video") is None:
            enc, trunc = self.encoder.encode(side, pv, grid, max(self.cfg.seq_buckets))
            return enc, trunc, None
        video = self._load_video(side, key, rid)
        if video is None:
            return None, False, side["video"]
        try:
            enc, trunc = self.encoder.encode(side, pv, grid, max(self.cfg.seq_buckets), videos=[video])
        except ValueError as e:  # the video's tokens alone overflow the largest sequence bucket
            err = VideoError(
                f"video {side['video']} of record {rid!r} ({tuple(video.grid_thw.tolist())} patches) does not fit "
                f"a row of {max(self.cfg.seq_buckets)} tokens: {e}; raise data.seq_buckets or lower "
                "data.video_max_pixels / data.video_max_frames"
            )
            if self.cfg.image_policy.mode == "fail":
                raise err from e
            return None, False, side["video"]
        return enc, trunc, None

    def encode_one(self, record: dict) -> tuple[dict | None, int, str | None]:
        """(encoded record or None, rows truncated, the bad image / video path when the skip policy drops it)."""
        out: dict[str, Any] = {"id": record["id"]}
        truncated = 0
        for key in self.group_keys:
            sides = record[key] if isinstance(record[key], list) else [record[key]]
            encs = []
            for side in sides:
                enc, trunc, bad = self._encode_side(side, key, record["id"])
                if enc is None:
                    return None, 0, bad
                truncated += trunc
                encs.append(enc)
            out[key] = encs
        return out, truncated, None

    def __call__(self, record: dict) -> dict:
        """Filter-path map: the record with ``_stats`` = (truncated, skipped paths not yet reported), or a
        ``{"_skip": path}`` marker that the filter drops."""
        self.seen += 1
        out, truncated, bad = self.encode_one(record)
        if out is None:
            self.skipped += 1
            pol = self.cfg.image_policy
            if self.seen >= pol.min_seen and self.skipped > pol.max_skip_fraction * self.seen:
                raise SkippedFractionError(
                    f"{self.skipped}/{self.seen} records skipped for bad images "
                    f"(> {pol.max_skip_fraction:.2%}); last: {bad}"
                )
            self.pending.append(bad)
            return {"_skip": bad}
        out["_stats"] = (truncated, self.pending)
        self.pending = []
        return out


class EncodedWithSubstitutes(grain.MapDataset):
    """Random-access encoding for the elastic flow: index i -> record i encoded, with ``_stats`` =
    (truncated, skipped paths). When the skip policy drops record i, the record at i + stride (then
    i + 2*stride, ..., wrapping at the end) takes its place; stride is the global batch size, so the
    substitute comes from a later global batch. Gives up after ``max_tries`` unreadable records."""

    def __init__(self, parent: grain.MapDataset, encode: EncodeRecord, stride: int, max_tries: int = 8):
        super().__init__(parent)
        self._encode, self._stride, self._max_tries = encode, stride, max_tries

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        bad_paths: list[str] = []
        for t in range(self._max_tries):
            out, truncated, bad = self._encode.encode_one(self._parent[(index + t * self._stride) % n])
            if out is not None:
                out["_stats"] = (truncated, bad_paths)
                return out
            bad_paths.append(bad)
        raise SkippedFractionError(
            f"record {index} and its {self._max_tries - 1} substitutes (every {self._stride}th record after "
            f"it) all have unreadable images: {bad_paths}"
        )

    def __str__(self) -> str:
        return f"EncodedWithSubstitutes(stride={self._stride})"


def not_skipped(rec: dict) -> bool:
    """Filter of the corpus flow: False for the skip marker :class:`EncodeRecord` returns."""
    return "_skip" not in rec
