"""Video sides through the Grain pipeline: batches equal the direct path (`load_video` +
`Tokenizer.encode_video_prompt` + `encoding.collate` + `model.inputs.build_inputs`, each tested against
transformers in tests/data/test_video.py and tests/model), static shapes, bad-video policies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

av = pytest.importorskip("av")

from elva_jax.data.encoding import PromptEncoder, collate  # noqa: E402
from elva_jax.data.media.image_processing import preprocess_images  # noqa: E402
from elva_jax.data.media.settings import MediaSettings  # noqa: E402
from elva_jax.data.media.video import VideoError, load_video  # noqa: E402
from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig  # noqa: E402
from elva_jax.data.pipeline.iterator import make_pipeline  # noqa: E402
from elva_jax.data.prompts import elva_prompt, instruct_prompt, lamra_prompt  # noqa: E402
from elva_jax.data.records import contrastive_records  # noqa: E402
from elva_jax.data.tokenize import Tokenizer  # noqa: E402
from elva_jax.model.config import ModelOptions  # noqa: E402
from elva_jax.model.inputs import build_inputs  # noqa: E402
from elva_jax.model.tiny import preset_config  # noqa: E402

BUCKETS = (96, 160, 256)
BUDGET = (4, 128)
MEDIA = MediaSettings(video_fps=2.0, video_min_frames=4, video_max_frames=8, video_min_pixels=4 * 28 * 28)


def _write(path, n=8, h=48, w=64, fps=4, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = np.stack([20 + xx * 2 + i * 9, 30 + yy * 3 + i * 5, 10 + (xx + yy) + i * 7], -1)
            f = np.clip(f + rng.integers(0, 8, f.shape), 0, 255).astype(np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    _write(d / "a.mp4", seed=0)
    _write(d / "b.mp4", n=12, h=40, w=40, fps=6, seed=1)
    from PIL import Image

    Image.fromarray(np.full((56, 84, 3), (200, 60, 30), np.uint8)).save(d / "img.png")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video stream")
    return d


def _side(text=None, image=None, video=None, instruction=None):
    s = {"text": text, "image": image, "instruction": instruction}
    if video is not None:
        s["video"] = video
    return s


def _corpus(media):
    return [
        {"id": "v", "item": _side(video=str(media / "a.mp4"), instruction="Recognize the motion in the video.")},
        {"id": "vt", "item": _side("a clip of a gradient", video=str(media / "b.mp4"))},
        {"id": "i", "item": _side("a red page", image=str(media / "img.png"))},
        {"id": "t", "item": _side("just some words")},
        {"id": "iv", "item": _side("both", image=str(media / "img.png"), video=str(media / "a.mp4"))},
    ]


def _cfg(model_cfg, tok, **kw):
    base = dict(batch_size=4, seq_buckets=BUCKETS, patch_budget=BUDGET, shuffle=False, process_index=0)
    base.update(process_count=1, pad_token_id=tok.pad_token_id, geometry=model_cfg.vision.geometry, media=MEDIA)
    return PipelineConfig(**{**base, **kw})


def _direct_rows(records, tok, template, cfg):
    """Each side by the direct path: load_video / preprocess_images, the template's prompt, then
    encode_video_prompt (video rows) or encode_prompt; rows in encoding.collate's format."""
    prompt_of = {
        "eol": lambda s, n, nv: lamra_prompt(s["text"], n, s["instruction"], n_videos=nv),
        "ret": lambda s, n, nv: elva_prompt(s["text"], n, s["instruction"], generation=True, n_videos=nv),
        "instruct_last": lambda s, n, nv: instruct_prompt(s["text"], n, s["instruction"], n_videos=nv),
    }[template]
    geo = cfg.geometry
    rows = []
    for r in records:
        s = r["item"]
        row, grid = {}, None
        if s["image"]:
            from PIL import Image

            pv, grid = preprocess_images(
                [Image.open(s["image"]).convert("RGB")],
                min_pixels=cfg.media.min_pixels,
                max_pixels=cfg.media.max_pixels,
                geometry=geo,
            )
            row.update(pixel_values=pv, image_grid_thw=grid)
        p = prompt_of(s, int(bool(s["image"])), int("video" in s))
        if "video" in s:
            v = load_video(
                s["video"], geo, fps=2.0, min_frames=4, max_frames=8, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28
            )
            row.update(tok.encode_video_prompt(p, [v], grid))
            row.update(
                pixel_values_videos=v.patches, video_grid_thw=v.grid_thw[None], second_per_grid_ts=[v.second_per_grid_t]
            )
        else:
            row.update(tok.encode_prompt(p, grid))
        rows.append(row)
    return rows


@pytest.mark.parametrize(
    "preset,template",
    [("tiny", "eol"), ("tiny", "ret"), ("tiny_qwen2_5_vl", "instruct_last"), ("tiny_qwen3_vl", "instruct_last")],
)
def test_corpus_batch_with_videos_equals_the_direct_path(media, preset, template):
    model_cfg = preset_config(preset)
    tok = Tokenizer.from_dir(geometry=model_cfg.vision.geometry)
    cfg = _cfg(model_cfg, tok, batch_size=5)
    recs = _corpus(media)
    it = make_pipeline(recs, PromptEncoder(tok, template, generation=template == "ret"), model_cfg, cfg, kind="corpus")
    got = next(it)
    assert it.last_ids == ["v", "vt", "i", "t", "iv"] and it.stats.videos == 3 and it.stats.images == 2
    ref = collate(_direct_rows(recs, tok, template, cfg), tok.pad_token_id, "right", length_bucket=BUCKETS)
    assert ref["video_grid_thw"].shape == (3, 3) and ref["image_grid_thw"].shape == (2, 3)
    want = build_inputs(model_cfg, ModelOptions(), **ref, rows=BUDGET[0], row_len=BUDGET[1])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert int((got["input_ids"] == model_cfg.video_token_id).sum()) == sum(
        int(np.prod(g)) // 4 for g in ref["video_grid_thw"]
    )
    if template == "eol":
        assert "Summarize above video and sentence in one word:" in tok.decode(got["input_ids"][0])


def test_contrastive_batches_with_video_queries_keep_static_shapes(media):
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    cfg = dataclasses.replace(_cfg(model_cfg, tok), batch_size=2, cand_patch_budget=(2, 128), shuffle=True)
    recs = [
        {
            "id": f"q{i}",
            "query": _side(video=str(media / ("a.mp4" if i % 2 else "b.mp4")), instruction="Find it."),
            "cands": [_side(f"caption {i}")],
        }
        for i in range(4)
    ] + [
        {"id": "qi", "query": _side("words", image=str(media / "img.png")), "cands": [_side("x")]},
        {"id": "qt", "query": _side("only text"), "cands": [_side("y")]},
    ]
    it = make_pipeline(recs, PromptEncoder(tok, "eol"), model_cfg, cfg)
    patch_shapes, keys = set(), set()
    for b in it:  # patch arrays keep one shape; token arrays take one of the sequence buckets
        keys.add(tuple(sorted(b["query"])) + tuple(sorted(b["cand"])))
        patch_shapes.add(tuple(b[g][k].shape for g in ("query", "cand") for k in ("patches", "vision_segment_ids")))
        assert b["query"]["input_ids"].shape[-1] in BUCKETS and b["cand"]["input_ids"].shape[-1] in BUCKETS
    assert it.stats.batches == 3 and it.stats.videos == 4 and len(keys) == 1
    assert patch_shapes == {((1, 4, 128, model_cfg.vision.patch_dim), (1, 4, 128), (1, 2, 128, 1176), (1, 2, 128))}


def test_a_missing_or_undecodable_video_fails_naming_file_and_record(media):
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    enc = PromptEncoder(tok, "eol")
    for name, what in (("gone.mp4", "not found"), ("broken.mp4", "cannot decode")):
        recs = [{"id": "bad-rec", "item": _side("x", video=str(media / name))}] + _corpus(media)[1:]
        it = make_pipeline(recs, enc, model_cfg, _cfg(model_cfg, tok), kind="corpus")
        with pytest.raises(VideoError, match=rf"(?s){what}.*{name}.*record 'bad-rec'"):
            next(it)


def test_the_skip_policy_drops_a_bad_video_and_counts_it(media):
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    cfg = _cfg(model_cfg, tok, batch_size=2, image_policy=ImagePolicy("skip", max_skip_fraction=0.5, min_seen=100))
    bad = str(media / "broken.mp4")
    recs = [{"id": "bad", "item": _side("x", video=bad)}] + _corpus(media)[:2]
    it = make_pipeline(recs, PromptEncoder(tok, "eol"), model_cfg, cfg, kind="corpus")
    next(it)
    assert it.last_ids == ["v", "vt"] and it.stats.skipped == 1 and it.stats.skipped_paths == [bad]
    # the elastic (training) flow substitutes the record one global batch later
    recs = [
        {"id": "bad", "query": _side(video=str(media / "gone.mp4"), instruction="i"), "cands": [_side("c0")]},
        {"id": "ok1", "query": _side(video=str(media / "a.mp4"), instruction="i"), "cands": [_side("c1")]},
        {"id": "ok2", "query": _side("t2"), "cands": [_side("c2")]},
        {"id": "ok3", "query": _side("t3"), "cands": [_side("c3")]},
    ]
    it = make_pipeline(recs, PromptEncoder(tok, "eol"), model_cfg, dataclasses.replace(cfg, cand_patch_budget=(2, 128)))
    next(it)
    assert it.last_ids == ["ok2", "ok1"] and it.stats.skipped == 1


def test_a_video_over_the_sequence_bucket_is_a_named_bad_video(media):
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    cfg = _cfg(model_cfg, tok, seq_buckets=(32,), batch_size=1)
    recs = [{"id": "long", "item": _side("x", video=str(media / "a.mp4"))}]
    with pytest.raises(VideoError, match=r"a\.mp4 of record 'long'.*does not fit a row of 32 tokens"):
        next(make_pipeline(recs, PromptEncoder(tok, "eol"), model_cfg, cfg, kind="corpus"))


def test_a_video_longer_than_a_patch_row_is_resampled_to_fit(media):
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    # 16 patches per frame, 2 temporal patches at 2 fps: a row of 16 keeps 2 frames (one temporal patch)
    cfg = _cfg(model_cfg, tok, batch_size=1, patch_budget=(1, 16))
    it = make_pipeline([_corpus(media)[0]], PromptEncoder(tok, "eol"), model_cfg, cfg, kind="corpus")
    b = next(it)
    assert int((b["vision_segment_ids"] > 0).sum()) == 16 and int(b["vision_segment_ids"].max()) == 1
    assert int((b["input_ids"] == model_cfg.video_token_id).sum()) == 4


@pytest.mark.parametrize("preset", ["tiny", "tiny_qwen3_vl"])
def test_an_over_long_video_row_loses_only_user_text(media, preset):
    """The truncated row is exactly the tokenization of the prompt with the text cut where the row's kept
    text ends (rebuilt from the decoded row through encode_video_prompt); every video token is kept."""
    model_cfg = preset_config(preset)
    geo = model_cfg.vision.geometry
    tok = Tokenizer.from_dir(geometry=geo)
    v = load_video(media / "a.mp4", geo, fps=2.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=50176)
    text = " ".join(f"word{i}" for i in range(200))
    full = tok.encode_video_prompt(instruct_prompt(text, n_videos=1), [v])
    got = tok.encode_prompt(instruct_prompt(text, n_videos=1), max_length=120, videos=[v])
    assert got["truncated"] and len(got["input_ids"]) <= 120 < len(full["input_ids"])
    n_vid = int((full["input_ids"] == model_cfg.video_token_id).sum())
    assert int((got["input_ids"] == model_cfg.video_token_id).sum()) == n_vid == int(got["n_video_tokens"][0])
    kept = tok.decode(got["input_ids"]).rsplit("<|vision_end|>", 1)[1].split("<|im_end|>", 1)[0]
    assert text.startswith(kept) and len(kept) < len(text)
    want = tok.encode_video_prompt(instruct_prompt(kept, n_videos=1), [v])["input_ids"]
    np.testing.assert_array_equal(got["input_ids"], want)
    # no truncation needed: the same ids as the direct path
    np.testing.assert_array_equal(
        tok.encode_prompt(instruct_prompt(text, n_videos=1), videos=[v])["input_ids"], full["input_ids"]
    )
    with pytest.raises(ValueError, match="1 video placeholders for 2 videos"):
        tok.encode_prompt(instruct_prompt(text, n_videos=1), videos=[v, v])


def test_gs_videos_and_frame_folders_batch_as_local_files(media, tmp_path):
    """A gs:// container (through epath) and a frame folder holding the container's decoded frames (PNG,
    lossless; its rate the side's video_fps) give the batch of the local file, array for array."""
    from helpers.epath_fake import fake_bucket
    from PIL import Image

    from elva_jax.data.media.video import decode_video

    frames, rate = decode_video(media / "a.mp4")
    folder = tmp_path / "a_frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i}.png")
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    enc, cfg = PromptEncoder(tok, "eol"), _cfg(model_cfg, tok, batch_size=2)

    def batch(video, **extra):
        recs = [{"id": f"r{i}", "item": {**_side("a clip", video=video), **extra}} for i in range(2)]
        return next(make_pipeline(recs, enc, model_cfg, cfg, kind="corpus"))

    want = batch(str(media / "a.mp4"))
    with fake_bucket(media):
        remote = batch("gs://bucket/a.mp4")
    for got in (remote, batch(str(folder), video_fps=rate)):
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _contains_block(patches: np.ndarray, block: np.ndarray) -> bool:
    """Whether ``block`` [n, D] lies contiguously in one row of ``patches`` [..., rows, row_len, D]."""
    rows = patches.reshape(-1, *patches.shape[-2:])
    n = len(block)
    return any(
        np.array_equal(row[o : o + n], block)
        for row in rows
        for o in range(len(row) - n + 1)
        if row[o, 0] == block[0, 0]
    )


def test_mbeir_records_with_video_fields_make_training_batches_with_video(media, tmp_path):
    """M-BEIR-format training files with query_video_path / video_path (files source): the records equal
    the hand-written sides, and the contrastive batch packs each video's patches (pixel_values_videos)
    with its <|video_pad|> tokens."""
    import json
    import shutil

    from elva_jax.data.benchmarks import mbeir
    from elva_jax.data.records import ContrastiveRecords
    from elva_jax.data.sources import open_source

    root = tmp_path / "mbeir"
    (root / "clips").mkdir(parents=True)
    for f in ("a.mp4", "b.mp4"):
        shutil.copy(media / f, root / "clips" / f)
    q = {"query_img_path": None, "query_src_content": None, "task_id": 0}
    queries = [
        {**q, "qid": "10:1", "query_txt": "what happens", "query_modality": "video,text"}
        | {"query_video_path": "clips/a.mp4", "pos_cand_list": ["10:11"], "neg_cand_list": ["10:12"]},
        {**q, "qid": "10:2", "query_txt": "find the clip", "query_modality": "text"}
        | {"pos_cand_list": ["10:12"], "neg_cand_list": ["10:11"]},
    ]
    pool = [
        {"did": "10:11", "txt": "a gradient moves", "img_path": None, "modality": "text"},
        {"did": "10:12", "txt": None, "img_path": None, "video_path": "clips/b.mp4", "modality": "video"},
    ]
    for rel, rows in (("query/train/v_train.jsonl", queries), ("cand_pool/global/v_pool.jsonl", pool)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = str(root / "clips/a.mp4"), str(root / "clips/b.mp4")
    t_cand, v_cand = _side("a gradient moves"), _side(video=b)
    want = [
        {"id": "10:1", "query": _side("what happens", video=a), "cands": [t_cand, v_cand]},
        {"id": "10:2", "query": _side("find the clip"), "cands": [v_cand, t_cand]},
    ]
    src = open_source(str(root), "files")
    recs = ContrastiveRecords(
        src.queries("query/train/v_train.jsonl"),
        src.pool("cand_pool/global/v_pool.jsonl"),
        src.image_root,
        num_negatives=1,
    )
    assert list(recs) == want
    listed = contrastive_records(
        mbeir.read_queries(root / "query/train/v_train.jsonl"),
        mbeir.read_pool(root / "cand_pool/global/v_pool.jsonl"),
        root,
        num_negatives=1,
    )
    assert listed == want
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    cfg = dataclasses.replace(_cfg(model_cfg, tok), batch_size=2, num_negatives=1, cand_patch_budget=(4, 128))
    it = make_pipeline(recs, PromptEncoder(tok, "eol"), model_cfg, cfg)
    batch = next(it)
    assert it.stats.videos == 3  # a.mp4 in a query, b.mp4 as two candidates
    kw = dict(fps=2.0, min_frames=4, max_frames=8, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, max_patches=128)
    va, vb = load_video(a, **kw), load_video(b, **kw)
    vid = model_cfg.video_token_id
    assert int((batch["query"]["input_ids"] == vid).sum()) == int(np.prod(va.grid_thw)) // 4
    assert int((batch["cand"]["input_ids"] == vid).sum()) == 2 * int(np.prod(vb.grid_thw)) // 4
    assert _contains_block(batch["query"]["patches"], va.patches)
    assert _contains_block(batch["cand"]["patches"], vb.patches)
    # prepared shards carry the videos' bytes: tests/data/test_sources_video.py
