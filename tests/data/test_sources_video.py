"""Videos in prepared shards: M-BEIR-format records with ``query_video_path`` / ``video_path`` (video files
and frame folders, with ``query_video_fps`` / ``video_fps``) prepared as ArrayRecord shards or an HF
datasets directory carry the video's bytes (a folder: its frames' bytes), and the contrastive batches
built from them equal, bit for bit, the batches built from the original files, with the files gone; a
video missing at preparation follows the image policy on every source."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

av = pytest.importorskip("av")

from PIL import Image  # noqa: E402

from elva_jax.data.benchmarks import mbeir  # noqa: E402
from elva_jax.data.encoding import PromptEncoder  # noqa: E402
from elva_jax.data.errors import DataFormatError  # noqa: E402
from elva_jax.data.media.settings import MediaSettings  # noqa: E402
from elva_jax.data.media.video import VideoError, frame_folder_files, load_video  # noqa: E402
from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig  # noqa: E402
from elva_jax.data.pipeline.iterator import make_pipeline  # noqa: E402
from elva_jax.data.prepare import prepare  # noqa: E402
from elva_jax.data.records import ContrastiveRecords, CorpusRecords, contrastive_records, corpus_records  # noqa: E402  # noqa: E402
from elva_jax.data.sources import open_source  # noqa: E402
from elva_jax.data.tokenize import Tokenizer  # noqa: E402
from elva_jax.model.tiny import preset_config  # noqa: E402

Q, POOL = "query/train/v_train.jsonl", "cand_pool/global/v_pool.jsonl"
KINDS = ("files", "array_record", "hf")
MEDIA = MediaSettings(video_fps=2.0, video_min_frames=4, video_max_frames=8, video_min_pixels=4 * 28 * 28)


def _frame(i, h, w, seed):
    rng = np.random.default_rng([seed, i])
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.stack([20 + xx * 2 + i * 9, 30 + yy * 3 + i * 5, 10 + (xx + yy) + i * 7], -1)
    return np.clip(f + rng.integers(0, 8, f.shape), 0, 255).astype(np.uint8)


def _write_mp4(path, n=8, h=48, w=64, fps=4, seed=0):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(_frame(i, h, w, seed), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _write_folder(path, n=12, h=40, w=56, seed=3):
    path.mkdir(parents=True)
    for i in range(n):  # 1.png .. 12.png: natural order differs from the names' sort order
        Image.fromarray(_frame(i, h, w, seed)).save(path / f"{i + 1}.png")
    (path / "notes.txt").write_text("not a frame")


def _tree(root, *, missing_video=False):
    (root / "clips").mkdir(parents=True)
    _write_mp4(root / "clips" / "a.mp4", seed=0)
    _write_mp4(root / "clips" / "b.mp4", n=12, h=40, w=40, fps=6, seed=1)
    _write_folder(root / "clips" / "frames_q")
    _write_folder(root / "clips" / "frames_c", n=10, h=48, w=48, seed=4)
    Image.fromarray(np.full((56, 84, 3), (200, 60, 30), np.uint8)).save(root / "clips" / "img.png")
    q = {"query_img_path": None, "query_src_content": {"x": 1}, "task_id": 0}
    queries = [
        {**q, "qid": "10:1", "query_txt": "what happens", "query_modality": "video,text"}
        | {"query_video_path": "clips/a.mp4", "pos_cand_list": ["10:11"], "neg_cand_list": ["10:12"]},
        {**q, "qid": "10:2", "query_txt": "find the clip", "query_modality": "text"}
        | {"pos_cand_list": ["10:12"], "neg_cand_list": ["10:13"]},
        {**q, "qid": "10:3", "query_txt": None, "query_modality": "video", "query_video_fps": 3}
        | {"query_video_path": "clips/frames_q", "pos_cand_list": ["10:13"], "neg_cand_list": ["10:14"]},
        {**q, "qid": "10:4", "query_txt": "a red page", "query_modality": "text"}
        | {"pos_cand_list": ["10:14"], "neg_cand_list": ["10:11"]},
    ]
    pool = [
        {"did": "10:11", "txt": "a gradient moves", "img_path": None, "modality": "text"},
        {"did": "10:12", "txt": None, "img_path": None, "video_path": "clips/b.mp4", "modality": "video"},
        {"did": "10:13", "txt": "frames", "img_path": None, "modality": "video,text"}
        | {"video_path": "clips/frames_c", "video_fps": 1.5},
        {"did": "10:14", "txt": "red", "img_path": "clips/img.png", "modality": "image,text"},
    ]
    if missing_video:
        pool[1]["video_path"] = "clips/gone.mp4"
    for rel, rows in ((Q, queries), (POOL, pool)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("vsrc")
    _tree(base / "mb")
    prepare(str(base / "mb"), str(base / "ar"), fmt="array_record", rows_per_shard=3, log=lambda _: None)
    prepare(str(base / "mb"), str(base / "hf"), fmt="hf", log=lambda _: None)
    return {"files": str(base / "mb"), "array_record": str(base / "ar"), "hf": str(base / "hf"), "base": base}


@pytest.fixture(scope="module")
def setup():
    model_cfg = preset_config("tiny")
    tok = Tokenizer.from_dir()
    cfg = PipelineConfig(
        batch_size=2,
        micro_batches=2,
        seq_buckets=(96, 160, 256),
        patch_budget=(4, 128),
        cand_patch_budget=(8, 128),
        num_negatives=1,
        shuffle=True,
        seed=3,
        num_epochs=None,
        process_index=0,
        process_count=1,
        pad_token_id=tok.pad_token_id,
        geometry=model_cfg.vision.geometry,
        media=MEDIA,
    )
    return model_cfg, PromptEncoder(tok, "eol"), cfg


def _view(roots, kind):
    src = open_source(roots[kind], kind)
    return ContrastiveRecords(src.queries(Q), src.pool(POOL), src.image_root, num_negatives=1)


def _reference(root):
    return contrastive_records(
        mbeir.read_queries(f"{root}/{Q}"), mbeir.read_pool(f"{root}/{POOL}"), root, num_negatives=1
    )


def _strip(rec):
    drop = ("image_bytes", "video_data", "where")
    side = lambda s: {k: v for k, v in s.items() if k not in drop}  # noqa: E731
    return {"id": rec["id"], "query": side(rec["query"]), "cands": [side(c) for c in rec["cands"]]}


def _same(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(jax.tree.map(np.array_equal, a, b))


def _batches(records, setup, n=2, **kw):
    model_cfg, enc, cfg = setup
    it = make_pipeline(records, enc, model_cfg, dataclasses.replace(cfg, **kw))
    return [(next(it), list(it.last_ids)) for _ in range(n)], it


def test_records_carry_the_videos_bytes_and_fps(roots):
    ref = _reference(roots["files"])
    fps = {r["id"]: r["query"].get("video_fps") for r in ref}
    assert fps["10:3"] == 3.0 and fps["10:1"] is None  # the record field, passed as the side's video_fps
    assert ref[1]["query"].get("video_fps") is None and ref[2]["cands"][0]["video_fps"] == 1.5
    for kind in ("array_record", "hf"):
        recs = list(_view(roots, kind))
        assert [_strip(r) for r in recs] == ref, kind
        for r in recs:
            for s in [r["query"], *r["cands"]]:
                if "video" not in s:
                    assert "video_data" not in s
                elif s["video"].endswith(".mp4"):
                    assert s["video_data"] == open(s["video"], "rb").read(), kind
                else:  # a frame folder: its frames' bytes in natural order, other files left out
                    files = frame_folder_files(s["video"])
                    assert len(files) in (10, 12) and files[1].endswith("/2.png")
                    assert s["video_data"] == [open(f, "rb").read() for f in files], kind


def test_video_batches_from_shards_equal_those_from_files(roots, setup):
    ref, ref_it = _batches(_reference(roots["files"]), setup)
    assert ref_it.stats.videos == 12 and ref_it.stats.images == 4  # 2 batches = 2 epochs of 6 videos, 2 images
    # the folder's rate matters: it sets the seconds per temporal patch (the positions' time axis)
    kw = dict(fps=2.0, min_frames=4, max_frames=8, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, max_patches=128)
    folder = f"{roots['files']}/clips/frames_c"
    assert load_video(folder, folder_fps=1.5, **kw).second_per_grid_t != load_video(folder, **kw).second_per_grid_t
    gone = roots["base"] / "clips_moved"
    shutil.move(f"{roots['files']}/clips", gone)  # the shards need no media file
    try:
        for kind in ("array_record", "hf"):
            got, it = _batches(_view(roots, kind), setup)
            assert it.stats.videos == 12, kind
            for (b, ids), (rb, rids) in zip(got, ref, strict=True):
                assert ids == rids and _same(b, rb), kind
            corpus = CorpusRecords(open_source(roots[kind], kind).pool(POOL), roots["files"])
            model_cfg, enc, cfg = setup
            ccfg = dataclasses.replace(cfg, shuffle=False, micro_batches=1, batch_size=4, num_epochs=1)
            batch = next(make_pipeline(corpus, enc, model_cfg, ccfg, kind="corpus"))
            assert batch["patches"].any()
    finally:
        shutil.move(gone, f"{roots['files']}/clips")
    ref_c = corpus_records(list(mbeir.read_pool(f"{roots['files']}/{POOL}").values()), roots["files"])
    want = next(make_pipeline(ref_c, enc, model_cfg, ccfg, kind="corpus"))
    assert _same(batch, want)


def test_a_video_missing_at_preparation_follows_the_policy(tmp_path, setup):
    root = tmp_path / "mb"
    _tree(root, missing_video=True)
    roots = {"files": str(root), "array_record": str(tmp_path / "ar"), "hf": str(tmp_path / "hf")}
    m = prepare(str(root), roots["array_record"], fmt="array_record", log=lambda _: None)
    prepare(str(root), roots["hf"], fmt="hf", log=lambda _: None)
    assert m["videos"] == {"stored": 2 + 1, "missing": 1}  # a.mp4, frames_q; frames_c; gone.mp4
    skip = dict(image_policy=ImagePolicy("skip", max_skip_fraction=0.9, min_seen=1))
    ref, ref_it = _batches(_reference(roots["files"]), setup, **skip)
    assert ref_it.stats.skipped >= 1
    for kind in ("array_record", "hf"):
        got, it = _batches(_view(roots, kind), setup, **skip)
        assert (it.stats.skipped, it.stats.seen) == (ref_it.stats.skipped, ref_it.stats.seen), kind
        assert all(i == ri and _same(b, rb) for (b, i), (rb, ri) in zip(got, ref, strict=True)), kind
    with pytest.raises(VideoError, match="video file not found"):
        _batches(_reference(roots["files"]), setup, n=1)
    with pytest.raises(VideoError, match=r"gone\.mp4 was missing when .*array_record, record \d+ was prepared"):
        _batches(_view(roots, "array_record"), setup, n=1)


def test_fps_fields_are_checked(tmp_path):
    base = {"qid": "10:1", "query_txt": "q", "query_img_path": None, "query_modality": "text", "task_id": 0}
    base |= {"pos_cand_list": ["10:2"], "neg_cand_list": [], "query_src_content": None}
    for bad, msg in (({"query_video_fps": 2}, "without a video"), ({"query_video_fps": -1}, "positive number")):
        p = tmp_path / "q.jsonl"
        p.write_text(json.dumps(base | bad) + "\n")
        with pytest.raises(DataFormatError, match=msg):
            mbeir.read_queries(p)
