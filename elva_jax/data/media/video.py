"""Video inputs: decode a file with PyAV, sample frames and cut them into patches as the family's
transformers video processor does.

`load_video(path, geometry, ...)` is the entry point (an embedding of a video query calls it, then puts
`video_prompt_text(...)` where the video goes in the prompt and hands `patches` / `grid_thw` /
`second_per_grid_t` to `elva_jax.model.inputs.build_inputs` as pixel_values_videos / video_grid_thw /
second_per_grid_ts).

Decoding: PyAV (`av`, FFmpeg bundled in the wheel), the first video stream, every frame as RGB uint8;
the frame rate is the stream's average rate. A *frame folder* (a directory of image files, e.g. MVBench's
episodic_reasoning frames) is a video too: its images (:data:`FRAME_EXTENSIONS`, other files ignored) in
natural order (digit runs compared as numbers: 2.jpg before 10.jpg), each converted to RGB, all of one
size, at the rate `folder_fps` given with it (only the sampled frames are read). A path with a scheme
(`gs://...`, any `etils.epath` backend) is read through epath: a container's bytes are read into memory
and handed to PyAV as a file object; a remote frame folder is listed and its images read the same way.

Sampling (`sample_frame_indices`), by the geometry's `video_rule`:
- "stride" (transformers' Qwen2-VL video processor, used by Qwen2-VL and Qwen2.5-VL): with fps f and a
  video of N frames at rate r, n = min(max(N / r * f, min_frames), floor(min(max_frames, N) / T) * T, N),
  n = floor(n / T) * T, indices = floor(arange(0, N, N / n)) in float32 (T = temporal_patch_size);
  fps None keeps every frame.
- "timestamps" (Qwen3-VL): n = min(max(int(N / r * f), min_frames), max_frames, N), indices =
  round(linspace(0, N - 1, n)); each temporal patch's time is the mean of its first and last frame's
  index / r, written `<x.x seconds>` before the patch (`video_prompt_text`).

Sizing: "stride" applies `image_processing.smart_resize(h, w)` with min/max pixels per frame;
"timestamps" applies Qwen3-VL's temporal rule (min/max pixels bound t' * h' * w', t' = the frame count
rounded to T; sides shorter than the factor are scaled up first).

Pixels: each frame resized with PIL bicubic and normalised exactly as `image_processing` does for an
image (bit-identical to transformers' PIL image processor on the same frame); the frame count padded to
a multiple of T by repeating the last frame, and T consecutive frames form one temporal patch
(patch_dim = C * T * P * P, laid out (C, T, row, col)). transformers' video processors resize with
torchvision's tensor bicubic instead of PIL's, which differs by a few uint8 levels on some pixels; no
torch-free path reproduces it, so PIL's per-frame result is the reference here (docs/video.md).

Patch budget: `max_patches` (e.g. a batch's patch row length) bounds t * h * w; a video over it is
resampled with fewer frames (max_frames lowered to the largest multiple of T that fits, the same
sampling rule; fps None then samples at the stream's rate), and a video whose T frames alone do not
fit raises `VideoError`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from etils import epath
from PIL import Image

from elva_jax.data.errors import ImageError
from elva_jax.data.media.image_processing import _normalisation_table, smart_resize
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry

__all__ = [
    "DEFAULT_FPS",
    "FRAME_EXTENSIONS",
    "VideoError",
    "VideoInput",
    "decode_video",
    "frame_folder_files",
    "frame_timestamps",
    "is_frame_folder",
    "load_video",
    "natural_key",
    "preprocess_frames",
    "sample_frame_indices",
    "temporal_smart_resize",
    "video_pad_counts",
    "video_prompt_text",
]

#: frames per second sampled by default (qwen-vl-utils' and Qwen3-VL's processor default)
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
#: transformers' video processors' per-video pixel limits (`size`), in visual tokens of ``factor x factor``
#: pixels (`PatchGeometry.factor`: 28 for Qwen2-VL / Qwen2.5-VL's 14-px patches, 32 for Qwen3-VL's 16-px ones)
DEFAULT_MIN_TOKENS = 128
DEFAULT_MAX_TOKENS = 768
#: image files that make up a frame folder (case-insensitive; VLM2Vec's frame loader takes .jpg / .jpeg / .png)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoError(ImageError):
    """A video file that cannot be decoded, sampled or fitted (names the file)."""


@dataclasses.dataclass(frozen=True)
class VideoInput:
    """One processed video.

    patches: float32 [t * h * w, patch_dim] (pixel_values_videos rows of this video).
    grid_thw: int64 [3] = (t temporal patches, h, w patch rows / columns).
    frame_indices: int64 [n] the sampled frames (before padding to a multiple of T).
    video_fps: the stream's frame rate.
    second_per_grid_t: seconds per temporal patch, T / sampled fps with sampled fps = n / N * video_fps
        (Qwen2.5-VL's second_per_grid_ts).
    timestamps: seconds of each temporal patch (Qwen3-VL's prompt), len t.
    """

    patches: np.ndarray
    grid_thw: np.ndarray
    frame_indices: np.ndarray
    video_fps: float
    second_per_grid_t: float
    timestamps: tuple[float, ...]


def _is_remote(path) -> bool:
    return "://" in str(path)


def _epath(path):
    return epath.Path(str(path))


def is_frame_folder(path: str | Path) -> bool:
    """Whether ``path`` (local or an epath URL) is a directory, i.e. a frame folder rather than a container."""
    return _epath(path).is_dir() if _is_remote(path) else Path(path).is_dir()


def natural_key(name: str) -> list:
    """Sort key of a file name with digit runs compared as numbers ("2.jpg" before "10.jpg")."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t]


def frame_folder_files(path: str | Path) -> list[str]:
    """The frame files of a frame folder in natural order (full paths; :data:`FRAME_EXTENSIONS` only)."""
    if _is_remote(path):
        names = [p.name for p in _epath(path).iterdir()]
    else:
        names = [p.name for p in Path(path).iterdir()]
    names = [n for n in names if n.lower().endswith(FRAME_EXTENSIONS)]
    if not names:
        raise VideoError(f"{path}: frame folder without image files ({', '.join(FRAME_EXTENSIONS)})")
    sep = "" if str(path).endswith("/") else "/"
    return [f"{path}{sep}{n}" for n in sorted(names, key=natural_key)]


def _read_frame(file: str, shape: tuple[int, int] | None, data: bytes | None = None) -> np.ndarray:
    """One frame as uint8 [H, W, 3] RGB from ``file`` or, given, from its bytes ``data`` (``file`` then
    only labels errors)."""
    try:
        if data is not None:
            im = Image.open(io.BytesIO(data))
        elif _is_remote(file):
            im = Image.open(io.BytesIO(_epath(file).read_bytes()))
        else:
            im = Image.open(file)
        with im:
            f = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoError(f"{file}: cannot read frame ({type(e).__name__}: {e})") from None
    if shape is not None and f.shape[:2] != shape:
        raise VideoError(f"{file}: frame of {f.shape[1]}x{f.shape[0]} px in a folder of {shape[1]}x{shape[0]} frames")
    return f


def _is_folder(path, data) -> bool:
    """A frame folder: ``data`` a list of frame bytes, or (no data) ``path`` a directory."""
    return isinstance(data, (list, tuple)) if data is not None else is_frame_folder(path)


def _open_video(
    path, folder_fps: float | None, data=None
) -> tuple[int, int, int, float, Callable[[np.ndarray], np.ndarray]]:
    """(N frames, H, W, frame rate, frames(indices) -> uint8 [n, H, W, 3]); a frame folder reads only the
    frames asked for, a container is decoded whole. ``data``: the contents in memory (a container's bytes,
    or a folder's frame files' bytes in natural order); ``path`` then only labels errors."""
    if _is_folder(path, data):
        if folder_fps is None or not folder_fps > 0:
            raise VideoError(f"{path}: a frame folder needs its frame rate (folder_fps > 0), got {folder_fps}")
        if data is not None:
            if not data:
                raise VideoError(f"{path}: frame folder without image files ({', '.join(FRAME_EXTENSIONS)})")
            files, blobs = [f"{path}, frame {i}" for i in range(len(data))], list(data)
        else:
            files = frame_folder_files(path)
            blobs = [None] * len(files)
        H, W = _read_frame(files[0], None, blobs[0]).shape[:2]

        def frames(idx: np.ndarray) -> np.ndarray:
            return np.stack([_read_frame(files[int(i)], (H, W), blobs[int(i)]) for i in idx])

        return len(files), H, W, float(folder_fps), frames
    all_frames, rate = _decode_container(path, data)
    N, H, W = all_frames.shape[:3]
    return N, H, W, rate, lambda idx: all_frames[idx]


def _decode_container(path, data: bytes | None = None) -> tuple[np.ndarray, float]:
    import av

    path = str(path)
    try:
        if data is not None:
            src = io.BytesIO(data)
        elif _is_remote(path):
            p = _epath(path)
            if not p.exists():
                raise VideoError(f"video file not found: {path}")
            src = io.BytesIO(p.read_bytes())  # PyAV reads (and seeks in) a file object
        else:
            src = path
        with av.open(src) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    if not frames:
        raise VideoError(f"{path}: the video stream has no frames")
    if rate is None or float(rate) <= 0:
        raise VideoError(f"{path}: the video stream has no frame rate")
    return np.stack(frames), float(rate)


def decode_video(path: str | Path, *, folder_fps: float | None = None) -> tuple[np.ndarray, float]:
    """All frames as uint8 [N, H, W, 3] RGB and the frame rate: the first video stream of a container
    (its average rate), or the images of a frame folder (at ``folder_fps``, required for a folder).
    Local paths or epath URLs (``gs://``)."""
    N, _, _, rate, frames = _open_video(path, folder_fps)
    return frames(np.arange(N)), rate


def sample_frame_indices(
    total: int,
    video_fps: float,
    *,
    fps: float | None = DEFAULT_FPS,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    geometry: PatchGeometry = DEFAULT_GEOMETRY,
    source: str = "<video>",
) -> np.ndarray:
    """Indices int64 [n] of the frames the family's processor keeps (module docstring for the rules)."""
    T = geometry.temporal_patch_size
    if geometry.video_rule == "timestamps":
        n = total if fps is None else int(total / video_fps * fps)
        n = min(max(n, min_frames), max_frames, total)
        return np.linspace(0, total - 1, n).round().astype(np.int64)
    if geometry.video_rule != "stride":
        raise ValueError(f"unknown video_rule {geometry.video_rule!r}")
    if fps is None:
        return np.arange(total, dtype=np.int64)
    cap = math.floor(min(max_frames, total) / T) * T
    n = min(max(total / video_fps * fps, min_frames), cap, total)
    n = math.floor(n / T) * T
    if n < 1:
        raise VideoError(f"{source}: {total} frames are fewer than one temporal patch of {T}")
    step = np.float32(total / n)
    return (np.arange(n, dtype=np.float32) * step).astype(np.int64)


def temporal_smart_resize(
    num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int, temporal_factor: int = 2
) -> tuple[int, int]:
    """Qwen3-VL's video size rule: (h', w') multiples of `factor` with min_pixels <= t' h' w' <= max_pixels
    (t' = round(num_frames / temporal_factor) * temporal_factor), aspect ratio kept; sides below the
    factor are first scaled up to it."""
    if num_frames < temporal_factor:
        raise VideoError(f"{num_frames} frames are fewer than the temporal patch size {temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"absolute aspect ratio must be at most 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_timestamps(indices: np.ndarray, video_fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Seconds per temporal patch: indices padded with the last to a multiple of T, index / fps, the mean
    of each patch's first and last (transformers' Qwen3-VL `_calculate_timestamps`)."""
    idx = list(np.asarray(indices).tolist())
    T = temporal_patch_size
    if len(idx) % T:
        idx += [idx[-1]] * (T - len(idx) % T)
    ts = [i / video_fps for i in idx]
    return tuple((ts[i] + ts[i + T - 1]) / 2 for i in range(0, len(ts), T))


def _frame_size(n: int, height: int, width: int, geometry: PatchGeometry, lo: int, hi: int) -> tuple[int, int]:
    if geometry.video_rule == "timestamps":
        return temporal_smart_resize(n, height, width, geometry.factor, lo, hi, geometry.temporal_patch_size)
    return smart_resize(height, width, geometry.factor, lo, hi)


def preprocess_frames(
    frames: np.ndarray, size: tuple[int, int], geometry: PatchGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames [n, H, W, 3] -> (patches float32 [t h w, patch_dim], grid_thw int64 [3]) at `size` (h', w')."""
    P, m, T = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    new_h, new_w = size
    table = _normalisation_table(tuple(geometry.image_mean), tuple(geometry.image_std))
    px = []
    for f in frames:
        r = np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
        px.append(table[np.arange(3)[:, None, None], r.transpose(2, 0, 1)])
    if len(px) % T:
        px += [px[-1]] * (T - len(px) % T)
    x = np.stack(px)  # [n', 3, H', W']
    gt, gh, gw = len(x) // T, new_h // P, new_w // P
    x = x.reshape(gt, T, 3, gh // m, m, P, gw // m, m, P)
    # (t, T, C, Bh, mh, ph, Bw, mw, pw) -> (t, Bh, Bw, mh, mw, C, T, ph, pw)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = np.ascontiguousarray(x).reshape(gt * gh * gw, 3 * T * P * P)
    return patches, np.array([gt, gh, gw], np.int64)


def load_video(
    path: str | Path,
    geometry: PatchGeometry = DEFAULT_GEOMETRY,
    *,
    fps: float | None = DEFAULT_FPS,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_patches: int | None = None,
    folder_fps: float | None = None,
    data: bytes | list[bytes] | None = None,
) -> VideoInput:
    """Decode, sample and patch one video (a container file or a frame folder, local or an epath URL) for
    the model whose geometry is `geometry` (`cfg.vision.geometry`).

    fps: frames sampled per second (None: every frame); min_frames / max_frames bound the count;
    min_pixels / max_pixels: the processor's pixel limits (per frame for "stride", over all frames for
    "timestamps"; default: transformers' video processor defaults for the patch size); max_patches: the
    patch budget t * h * w (None: no bound); folder_fps: a frame folder's frame rate (None: the folder is
    taken as already sampled, at `fps` (or DEFAULT_FPS when fps is None), so the rule keeps its frames up
    to max_frames, evenly spaced, as VLM2Vec samples its saved frame folders; ignored for containers);
    data: the video in memory instead of the file (prepared shards): a container's bytes, or a frame
    folder's images' bytes in natural order (a list); decoded exactly as the file would be, ``path`` only
    labels errors.
    Returns a `VideoInput` (patches, grid_thw, frame indices,
    the stream's fps, second_per_grid_t, timestamps).

    Raises:
      VideoError: the file cannot be decoded, has too few frames, or does not fit `max_patches`.
    """
    lo = DEFAULT_MIN_TOKENS * geometry.factor**2 if min_pixels is None else min_pixels
    hi = DEFAULT_MAX_TOKENS * geometry.factor**2 if max_pixels is None else max_pixels
    if folder_fps is None and _is_folder(path, data):
        folder_fps = DEFAULT_FPS if fps is None else fps
    N, H, W, video_fps, read_frames = _open_video(path, folder_fps, data)
    T = geometry.temporal_patch_size
    idx = sample_frame_indices(
        N, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames, geometry=geometry, source=str(path)
    )
    try:
        size = _frame_size(len(idx), H, W, geometry, lo, hi)
    except ImageError as e:
        raise VideoError(f"{path}: {e}") from None
    if max_patches is not None:
        per_frame = (size[0] // geometry.patch_size) * (size[1] // geometry.patch_size)
        t = -(-len(idx) // T)
        if t * per_frame > max_patches:
            keep = (max_patches // per_frame) * T
            if keep < T:
                raise VideoError(
                    f"{path}: one temporal patch of {per_frame} patches ({size[0]}x{size[1]} px) exceeds the "
                    f"patch budget {max_patches}; lower max_pixels"
                )
            # the same rule with max_frames = keep (fps None: the stream's own rate, i.e. every frame)
            idx = sample_frame_indices(
                N,
                video_fps,
                fps=video_fps if fps is None else fps,
                min_frames=min(min_frames, keep),
                max_frames=keep,
                geometry=geometry,
            )
            size = _frame_size(len(idx), H, W, geometry, lo, hi)
    patches, grid = preprocess_frames(read_frames(idx), size, geometry)
    sampled_fps = len(idx) / N * video_fps
    return VideoInput(
        patches=patches,
        grid_thw=grid,
        frame_indices=idx,
        video_fps=video_fps,
        second_per_grid_t=T / sampled_fps,
        timestamps=frame_timestamps(idx, video_fps, T),
    )


def video_pad_counts(video: VideoInput, geometry: PatchGeometry = DEFAULT_GEOMETRY) -> list[int]:
    """`<|video_pad|>` tokens of each pad run of `video`: one run of t h w / m^2 ("stride"), or t runs of
    h w / m^2 ("timestamps")."""
    t, h, w = (int(x) for x in video.grid_thw)
    per_frame = h * w // geometry.merge_size**2
    return [per_frame] * t if geometry.video_rule == "timestamps" else [t * per_frame]


def video_prompt_text(video: VideoInput, geometry: PatchGeometry = DEFAULT_GEOMETRY, *, expand: bool = True) -> str:
    """The text that replaces a chat template's `<|vision_start|><|video_pad|><|vision_end|>` for `video`:
    "stride" families the same triple with t h w / m^2 pads; "timestamps" (Qwen3-VL) per temporal patch
    `<x.x seconds><|vision_start|>` + `<|video_pad|>` * (h w / m^2) + `<|vision_end|>` (the whole triple
    replaced, as Qwen's processor in transformers 4.57 and qwen-vl-utils do). expand=False: one pad per
    run (`video_pad_counts` gives each run's count, for id-level expansion)."""
    counts = video_pad_counts(video, geometry)
    pads = [c if expand else 1 for c in counts]
    if geometry.video_rule == "timestamps":
        return "".join(
            f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"
            for s, n in zip(video.timestamps, pads, strict=True)
        )
    return "<|vision_start|>" + "<|video_pad|>" * pads[0] + "<|vision_end|>"
