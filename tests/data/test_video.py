"""Video decoding, sampling and preprocessing against independent oracles.

- decoding: synthetic videos written with PyAV in a temp dir (lossless FFV1 in Matroska: frames equal
  the written ones; MPEG-4 Part 2 in MP4 and VP8 in WebM: lossy, close to them);
- sampling and sizing: transformers' own `sample_frames` / `smart_resize` (Qwen2-VL and Qwen3-VL video
  processors), read from the installed source files (the modules import torchvision, which this
  environment lacks, so the functions are compiled alone with their `math` / `numpy` / `torch` names);
- pixels: transformers' PIL image processor applied to every sampled frame, its patches recombined
  per temporal pair (each image patch is (C, T, P, P) with the frame repeated over T);
- prompts: the Qwen3-VL timestamp text built from transformers' `Qwen3VLProcessor._calculate_timestamps`.
"""

from __future__ import annotations

import ast
import math
import types

import numpy as np
import pytest

av = pytest.importorskip("av")

from elva_jax.data.media.video import (  # noqa: E402
    VideoError,
    decode_video,
    frame_timestamps,
    load_video,
    sample_frame_indices,
    temporal_smart_resize,
    video_prompt_text,
)
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry  # noqa: E402

QWEN3_GEOMETRY = PatchGeometry(16, 2, 2, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), video_rule="timestamps")


def _frames(n, h, w, seed=0):
    """Smooth moving gradients without wrap-around (lossy codecs keep them well) plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        f = np.stack([20 + xx * 2 + i * 5, 30 + yy * 3 + i * 4, 10 + (xx + yy) + i * 6], -1)
        out.append(np.clip(f + rng.integers(0, 8, f.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def _write(path, frames, codec, fps=10, pix_fmt="yuv420p"):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.bit_rate = 4_000_000
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    frames = _frames(12, 48, 64)
    paths = {
        "mkv_ffv1": (d / "a.mkv", "ffv1", "bgr0"),
        "mp4_mpeg4": (d / "a.mp4", "mpeg4", "yuv420p"),
        "webm_vp8": (d / "a.webm", "libvpx", "yuv420p"),
    }
    for p, codec, fmt in paths.values():
        _write(p, frames, codec, pix_fmt=fmt)
    return frames, {k: v[0] for k, v in paths.items()}


# ---------------------------------------------------------------- the transformers oracle functions

_TF = None


def _transformers_functions():
    """{"qwen2_smart_resize", "qwen2_sample", "qwen3_smart_resize", "qwen3_sample", "timestamps"} compiled
    from transformers' installed source (no torchvision import)."""
    global _TF
    if _TF is not None:
        return _TF
    torch = pytest.importorskip("torch")
    import transformers

    root = transformers.__file__.rsplit("/", 1)[0] + "/models/"

    def grab(rel, name, cls=None):
        tree = ast.parse(open(root + rel).read())
        nodes = tree.body
        if cls:
            nodes = next(n for n in nodes if isinstance(n, ast.ClassDef) and n.name == cls).body
        fn = next(n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == name)
        fn.decorator_list = []
        fn.returns = None
        for a in fn.args.args + fn.args.kwonlyargs:
            a.annotation = None
        ns = {"math": math, "np": np, "torch": torch, "logger": types.SimpleNamespace(warning_once=print)}
        exec(compile(ast.Module([fn], []), rel, "exec"), ns)
        return ns[name]

    _TF = {
        "qwen2_smart_resize": grab("qwen2_vl/video_processing_qwen2_vl.py", "smart_resize"),
        "qwen2_sample": grab("qwen2_vl/video_processing_qwen2_vl.py", "sample_frames", "Qwen2VLVideoProcessor"),
        "qwen3_smart_resize": grab("qwen3_vl/video_processing_qwen3_vl.py", "smart_resize"),
        "qwen3_sample": grab("qwen3_vl/video_processing_qwen3_vl.py", "sample_frames", "Qwen3VLVideoProcessor"),
        "timestamps": grab("qwen3_vl/processing_qwen3_vl.py", "_calculate_timestamps", "Qwen3VLProcessor"),
    }
    return _TF


def _meta(total, fps):
    return types.SimpleNamespace(total_num_frames=total, fps=fps)


def _self(**kw):
    base = dict(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)
    return types.SimpleNamespace(**{**base, **kw})


CASES = [
    (total, vfps, fps, mx)
    for total in (4, 7, 12, 31, 100, 301)
    for vfps in (10, 24, 29.97)
    for fps in (1, 2, 3.5)
    for mx in (8, 768)
]


def test_stride_sampling_equals_qwen2_vl_processor():
    tf = _transformers_functions()
    for total, vfps, fps, mx in CASES:
        try:
            ref = np.asarray(tf["qwen2_sample"](_self(max_frames=mx), _meta(total, vfps), fps=fps))
        except (ValueError, ZeroDivisionError):
            with pytest.raises(VideoError):
                sample_frame_indices(total, vfps, fps=fps, max_frames=mx)
            continue
        got = sample_frame_indices(total, vfps, fps=fps, max_frames=mx)
        np.testing.assert_array_equal(got, ref, err_msg=str((total, vfps, fps, mx)))


def test_timestamp_sampling_and_times_equal_qwen3_vl_processor():
    tf = _transformers_functions()
    for total, vfps, fps, mx in CASES:
        ref = np.asarray(tf["qwen3_sample"](_self(max_frames=mx), _meta(total, vfps), fps=fps))
        got = sample_frame_indices(total, vfps, fps=fps, max_frames=mx, geometry=QWEN3_GEOMETRY)
        np.testing.assert_array_equal(got, ref, err_msg=str((total, vfps, fps, mx)))
        assert frame_timestamps(got, vfps, 2) == tuple(tf["timestamps"](None, got, vfps, 2))


def test_sizes_equal_transformers_smart_resize():
    tf = _transformers_functions()
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(8, 2000, 2))
        if max(h, w) / min(h, w) > 150:
            continue
        n = int(rng.integers(2, 64))
        lo, hi = sorted(int(x) for x in rng.integers(4 * 32 * 32, 2000 * 32 * 32, 2))
        assert temporal_smart_resize(n, h, w, 32, lo, hi) == tuple(tf["qwen3_smart_resize"](n, h, w, 2, 32, lo, hi))
        if h >= 28 and w >= 28:
            from elva_jax.data.media.image_processing import smart_resize

            assert smart_resize(h, w, 28, lo, hi) == tuple(tf["qwen2_smart_resize"](h, w, 28, lo, hi))


# ---------------------------------------------------------------- decoding and pixels


@pytest.mark.parametrize("name", ["mkv_ffv1", "mp4_mpeg4", "webm_vp8"])
def test_decode_round_trip(videos, name):
    frames, paths = videos
    got, rate = decode_video(paths[name])
    assert got.shape == frames.shape and got.dtype == np.uint8 and rate == 10
    err = np.abs(got.astype(int) - frames.astype(int))
    if name == "mkv_ffv1":
        assert err.max() == 0  # lossless codec, RGB pixel format
    else:
        assert err.mean() < 6, err.mean()


def _pil_oracle(frames, geometry, lo, hi):
    """transformers' PIL image processor per frame, pairs of frames recombined into temporal patches."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(
        min_pixels=lo,
        max_pixels=hi,
        patch_size=geometry.patch_size,
        merge_size=geometry.merge_size,
        temporal_patch_size=geometry.temporal_patch_size,
        image_mean=list(geometry.image_mean),
        image_std=list(geometry.image_std),
    )
    T, P = geometry.temporal_patch_size, geometry.patch_size
    per = []
    for f in frames:
        out = proc([Image.fromarray(f)])
        per.append(np.asarray(out["pixel_values"]).reshape(-1, 3, T, P, P)[:, :, 0])
        grid = np.asarray(out["image_grid_thw"])[0]
    if len(per) % T:
        per += [per[-1]] * (T - len(per) % T)
    pairs = [np.stack(per[i : i + T], axis=2) for i in range(0, len(per), T)]  # [hw, C, T, P, P]
    return np.concatenate([p.reshape(len(p), -1) for p in pairs]), np.array([len(pairs), grid[1], grid[2]])


@pytest.mark.parametrize(
    "geometry, fps, lo, hi",
    [
        (DEFAULT_GEOMETRY, 5.0, 16 * 28 * 28, 64 * 28 * 28),  # 6 frames, upscaled frames
        (DEFAULT_GEOMETRY, None, 2 * 28 * 28, 2 * 28 * 28),  # every frame, downscaled
        (QWEN3_GEOMETRY, 3.0, 4 * 32 * 32, 96 * 32 * 32),  # 4 frames, within the limits: sizes as for an image
    ],
    ids=["stride_fps5", "stride_all_frames", "timestamps_fps3"],
)
def test_patches_equal_per_frame_pil_processor(videos, geometry, fps, lo, hi):
    frames, paths = videos
    v = load_video(paths["mkv_ffv1"], geometry, fps=fps, min_pixels=lo, max_pixels=hi)
    idx = sample_frame_indices(12, 10.0, fps=fps, geometry=geometry)
    np.testing.assert_array_equal(v.frame_indices, idx)
    if geometry.video_rule == "timestamps":
        n = len(idx)
        h, w = temporal_smart_resize(n, 48, 64, geometry.factor, lo, hi)
        assert (h, w) == (64, 64)  # = the image processor's own size for one frame, checked below
    ref, ref_grid = _pil_oracle(frames[idx], geometry, lo, hi if geometry.video_rule == "stride" else 64 * 64)
    np.testing.assert_array_equal(v.grid_thw, ref_grid)
    assert np.abs(v.patches - ref).max() == 0
    assert v.second_per_grid_t == pytest.approx(2 / (len(idx) / 12 * 10))


def test_prompt_text_per_rule(videos):
    _, paths = videos
    v = load_video(paths["mp4_mpeg4"], QWEN3_GEOMETRY, fps=2.5, min_pixels=4 * 32 * 32, max_pixels=96 * 32 * 32)
    assert len(v.frame_indices) == 4 and tuple(v.grid_thw) == (2, 4, 4)
    text = video_prompt_text(v, QWEN3_GEOMETRY)
    tf = _transformers_functions()
    times = tf["timestamps"](None, v.frame_indices, 10.0, 2)
    expect = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>" for t in times)
    assert text == expect and text.startswith("<0.2 seconds>")
    s = video_prompt_text(load_video(paths["mp4_mpeg4"], fps=None, max_pixels=28 * 28 * 2))
    # 48x64 frames under 2*28*28 pixels -> 28x28 (2x2 patches, one token), 12 frames -> 6 temporal patches
    assert s == "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"


def test_patch_budget_resamples_fewer_frames_or_refuses(videos):
    _, paths = videos
    full = load_video(paths["mkv_ffv1"], fps=None, min_pixels=4 * 28 * 28, max_pixels=4 * 28 * 28)
    assert tuple(full.grid_thw) == (6, 4, 4)  # 96 patches
    cut = load_video(paths["mkv_ffv1"], fps=None, min_pixels=4 * 28 * 28, max_pixels=4 * 28 * 28, max_patches=50)
    assert tuple(cut.grid_thw) == (3, 4, 4)  # 6 frames sampled by the stride rule
    with pytest.raises(VideoError, match="exceeds the patch budget 8"):
        load_video(paths["mkv_ffv1"], fps=None, min_pixels=4 * 28 * 28, max_pixels=4 * 28 * 28, max_patches=8)


def test_unreadable_file_is_a_named_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoError, match="broken.mp4"):
        decode_video(bad)


# ---------------------------------------------------------------- end to end: file -> tokens -> both models


@pytest.mark.reference
@pytest.mark.parametrize(
    "preset, fps",
    [("tiny_qwen2_5_vl", 5.0), ("tiny_qwen3_vl", 2.5), ("tiny", 0)],
    ids=["qwen2_5_vl", "qwen3_vl", "qwen2_vl_all_frames"],
)
def test_compare_video_rows_end_to_end(videos, tmp_path, capsys, preset, fps):
    """`python -m elva_jax.compare --video`: a decoded video file and a text row through elva_jax's prompt,
    tokenizer and video path; the token ids equal the tokenizer's chat template with the placeholder
    expanded independently, and the model outputs equal transformers' (fp32)."""
    import json

    pytest.importorskip("transformers")
    from elva_jax import compare
    from elva_jax.model.tiny import write_random_checkpoint

    _, paths = videos
    d = str(tmp_path / "model")
    write_random_checkpoint(d, preset)
    argv = [
        "--hf-dir",
        d,
        "--video",
        str(paths["mp4_mpeg4"]),
        "--text",
        "what moves?",
        "--video",
        str(paths["webm_vp8"]),
    ]
    argv += ["--template", "instruct_last", "--instruction", "Find the clip.", "--fps", str(fps)]
    argv += ["--video-min-pixels", str(4 * 28 * 28), "--video-max-pixels", str(16 * 28 * 28), "--tol", "1e-5"]
    rc = compare.main(argv)
    res = json.loads(capsys.readouterr().out)
    assert res["inputs"]["input_ids_equal"] and res["n_videos"] == 2, res
    assert rc == 0 and res["pass"] is True, res["errors"]


def test_video_rows_collate_into_model_inputs(videos):
    """A video row, an image row and a text row: `encode_video_prompt` + `collate` give what `build_inputs`
    takes (video and image features matched to their pads, packed into a fixed budget)."""
    from elva_jax.data.encoding import collate
    from elva_jax.data.media.image_processing import preprocess_image
    from elva_jax.data.prompts import instruct_prompt
    from elva_jax.data.tokenize import Tokenizer, default_tokenizer_dir
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.inputs import build_inputs
    from elva_jax.model.tiny import preset_config

    frames, paths = videos
    cfg = preset_config("tiny_qwen3_vl")
    geo = cfg.vision.geometry
    tok = Tokenizer.from_dir(default_tokenizer_dir(), geometry=geo)
    v = load_video(paths["mkv_ffv1"], geo, fps=2.5, min_pixels=4 * 32 * 32, max_pixels=96 * 32 * 32)
    row_v = tok.encode_video_prompt(instruct_prompt("clip", n_videos=1), [v])
    row_v.update(pixel_values_videos=v.patches, video_grid_thw=v.grid_thw[None], second_per_grid_ts=[0.5])
    pv, g = preprocess_image(frames[0], min_pixels=4 * 32 * 32, max_pixels=8 * 32 * 32, geometry=geo)
    row_i = tok.encode_prompt(instruct_prompt("still", 1), g[None])
    row_i.update(pixel_values=pv, image_grid_thw=g[None])
    row_t = tok.encode_prompt(instruct_prompt("text only"))
    batch = collate([row_v, row_i, row_t], tok.pad_token_id, "left")
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] and batch["second_per_grid_ts"].tolist() == [0.5]
    x = build_inputs(cfg, ModelOptions(), **batch, rows=2, row_len=64)
    assert int((x["input_ids"] == cfg.video_token_id).sum()) == 8 and x["patches"].shape == (2, 64, geo.patch_dim)
    # images first, then videos; one attention segment per temporal patch: image (16 patches), the video's
    # two frames (16 each), padding
    seg, counts = np.unique(x["vision_segment_ids"][0], return_counts=True)
    assert dict(zip(seg.tolist(), counts.tolist(), strict=True)) == {0: 16, 1: 16, 2: 16, 3: 16}
    with pytest.raises(ValueError, match="1 video placeholders for 2 videos"):
        tok.encode_video_prompt(instruct_prompt("clip", n_videos=1), [v, v])


# ---------------------------------------------------------------- frame folders and epath (gs://) videos


def _frame_folder(d, frames, ext=".png"):
    """frames written as 1.png .. N.png (natural order differs from string order past 9) + a stray file."""
    from PIL import Image

    d.mkdir()
    for i, f in enumerate(frames, 1):
        Image.fromarray(f).save(d / f"{i}{ext}")
    (d / "notes.txt").write_text("not a frame")
    return d


@pytest.fixture(scope="module")
def folder(videos, tmp_path_factory):
    frames, _ = videos
    return _frame_folder(tmp_path_factory.mktemp("frames") / "clip", frames)


@pytest.mark.parametrize(
    "geometry, fps",
    [(DEFAULT_GEOMETRY, 5.0), (DEFAULT_GEOMETRY, None), (QWEN3_GEOMETRY, 3.0)],
    ids=["stride_fps5", "stride_all_frames", "timestamps_fps3"],
)
def test_frame_folder_equals_the_same_frames_in_a_container(videos, folder, geometry, fps):
    """PNG frames and the FFV1 (RGB) container hold the same pixels (both lossless), so the two videos
    must give identical patches, grids, sampled indices and times (tolerance 0)."""
    frames, paths = videos
    got, rate = decode_video(folder, folder_fps=10)
    assert rate == 10.0 and np.array_equal(got, frames)
    kw = dict(fps=fps, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    a = load_video(folder, geometry, folder_fps=10, **kw)
    b = load_video(paths["mkv_ffv1"], geometry, **kw)
    assert np.array_equal(a.patches, b.patches) and np.array_equal(a.grid_thw, b.grid_thw)
    assert np.array_equal(a.frame_indices, b.frame_indices) and a.timestamps == b.timestamps
    assert a.second_per_grid_t == b.second_per_grid_t


def test_frame_folder_without_a_rate_is_taken_as_sampled(videos, folder):
    """No folder_fps: the folder's rate is the sampling fps, so the stride rule keeps min(N, max_frames)
    frames evenly: 12 frames, max 8 -> floor(arange(8) * 12 / 8) = 0 1 3 4 6 7 9 10."""
    frames, _ = videos
    v = load_video(folder, fps=2.0, max_frames=8, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    assert v.frame_indices.tolist() == [0, 1, 3, 4, 6, 7, 9, 10] and v.video_fps == 2.0
    assert v.grid_thw[0] == 4


def test_frame_folder_errors(videos, tmp_path):
    frames, _ = videos
    d = _frame_folder(tmp_path / "mixed", frames[:3])
    with pytest.raises(VideoError, match="frame rate"):
        decode_video(d)
    from PIL import Image

    Image.fromarray(frames[0][:20]).save(d / "4.png")
    with pytest.raises(VideoError, match=r"4\.png: frame of 64x20 px in a folder of 64x48"):
        decode_video(d, folder_fps=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="without image files"):
        load_video(tmp_path / "empty")


def test_gs_videos_read_through_epath(videos, folder):
    """A gs:// container (bytes through epath into PyAV) and a gs:// frame folder give the local result."""
    from helpers.epath_fake import fake_bucket

    _, paths = videos
    kw = dict(fps=5.0, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    with fake_bucket(paths["mkv_ffv1"].parent) as calls:
        remote = load_video("gs://bucket/a.mkv", **kw)
        assert calls["n"] > 0
        with pytest.raises(VideoError, match="not found: gs://bucket/missing.mkv"):
            decode_video("gs://bucket/missing.mkv")
    with fake_bucket(folder.parent) as calls:
        remote_folder = load_video("gs://bucket/clip", folder_fps=10, **kw)
        assert calls["n"] > 0
    local = load_video(paths["mkv_ffv1"], **kw)
    for v in (remote, remote_folder):
        assert np.array_equal(v.patches, local.patches) and np.array_equal(v.frame_indices, local.frame_indices)
