"""Evaluation with Embed-RL T-CoTs (`elva_jax.eval.cot`): the CoT cache (generate calls counted), the crop
geometry against numpy slicing of a known image, an embedding with its CoT against the training path
(`FrozenEmbedder`), evidence crops from a known CoT, and ``python -m elva_jax.eval --benchmark mmeb --cot``
end to end on the bundled MMEB set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elva_jax.data.media.settings import MediaSettings
from elva_jax.eval.cot import CoTConfig, CoTGenerator, box_pixels, crop_box, side_key

REPO = Path(__file__).resolve().parents[2]
SUMMARISE = "Summarize the above input and its reasoning in one word: "
MEDIA = MediaSettings(patch_row_len=64, min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="module")
def models():
    """(tokenizer, reasoner cfg + params (tiny Qwen2-VL), embedder cfg + params (tiny Qwen3-VL))."""
    import jax

    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config

    tok = Tokenizer.from_dir()
    rcfg, ecfg = preset_config("tiny"), preset_config("tiny_qwen3_vl")
    return tok, (rcfg, init_params(rcfg, jax.random.key(0), std=0.05)), (ecfg, init_params(ecfg, jax.random.key(5)))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A 40 x 30 RGB image with distinct pixel values (R = column * 6, G = row * 8, B = 100)."""
    H, W = 30, 40
    arr = np.zeros((H, W, 3), np.uint8)
    arr[..., 0] = (np.arange(W) * 6)[None]
    arr[..., 1] = (np.arange(H) * 8)[:, None]
    arr[..., 2] = 100
    p = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(arr).save(p)
    return str(p)


CCFG = CoTConfig(max_tokens=6, batch_size=2, seq_buckets=(192,), media=MEDIA)


def _gen(models, root, ccfg=CCFG):
    tok, (rcfg, rparams), _ = models
    return CoTGenerator(rparams, rcfg, tok, ccfg, identity={"test": "reasoner"}, cache_root=root, log=lambda s: None)


def test_box_pixels_against_hand_computed_slices(image_path):
    arr = np.asarray(Image.open(image_path).convert("RGB"))
    assert arr.shape == (30, 40, 3)
    # [250, 100, 500, 900] on W=40, H=30: left floor(10.0)=10, top floor(3.0)=3, right ceil(20.0)=20,
    # bottom ceil(27.0)=27
    assert box_pixels([250, 100, 500, 900], 40, 30) == (10, 3, 20, 27)
    np.testing.assert_array_equal(crop_box(arr, [250, 100, 500, 900]), arr[3:27, 10:20])
    # fractional edges: left floor(13.32)=13, right ceil(13.36)=14 (one column); top 0, bottom ceil(30.0)=30
    np.testing.assert_array_equal(crop_box(arr, [333, 0, 334, 1000]), arr[0:30, 13:14])
    # the whole image, and a degenerate-looking box kept one pixel wide at the border
    np.testing.assert_array_equal(crop_box(arr, [0, 0, 1000, 1000]), arr)
    assert box_pixels([1000, 1000, 1000, 1000], 40, 30) == (39, 29, 40, 30)
    c = crop_box(arr, [250, 100, 500, 900])  # the crop holds the pixels of columns 10..19, rows 3..26
    assert c[0, 0, 0] == 10 * 6 and c[0, 0, 1] == 3 * 8 and c[-1, -1, 0] == 19 * 6 and c[-1, -1, 1] == 26 * 8


def test_cot_cache_counts_generate_calls(models, image_path, tmp_path):
    sides = [
        {"text": "a red car", "image": None, "instruction": None},
        {"text": "two dogs", "image": None, "instruction": "Find a caption."},
        {"text": None, "image": image_path, "instruction": None},
        {"text": "a red car", "image": None, "instruction": None},  # the first again
        {"text": "a boat", "image": None, "instruction": None},
    ]
    g1 = _gen(models, tmp_path)
    cots = g1.cots(sides)
    assert g1.generate_calls == 2  # 4 distinct sides in batches of 2
    assert g1.stats["generated"] == 4 and g1.stats["cached"] == 1
    assert cots[0] == cots[3] and all(isinstance(c, str) for c in cots)
    lines = (g1.dir / "cots.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == sorted({side_key(s) for s in sides})
    # a rerun (a fresh generator on the same cache) generates nothing and reads the same CoTs
    g2 = _gen(models, tmp_path)
    assert g2.dir == g1.dir and g2.cots(sides) == cots
    assert g2.generate_calls == 0 and g2.stats["generated"] == 0 and g2.stats["cached"] == 5
    # a new side: one call for it alone; greedy CoTs of the old sides do not change
    g2.cots(sides + [{"text": "snow", "image": None, "instruction": None}])
    assert g2.generate_calls == 1 and g2.stats["generated"] == 1
    # other decoding settings: another cache directory, everything generated again
    g3 = _gen(models, tmp_path, CoTConfig(**{**CCFG.__dict__, "max_tokens": 5}))
    assert g3.dir != g1.dir
    g3.cots(sides[:2])
    assert g3.generate_calls == 1 and g3.stats["generated"] == 2


def test_embedding_with_cot_equals_the_frozen_embedder(models, image_path, tmp_path):
    """The eval path (corpus pipeline, right padding, Embedder) against the training path (FrozenEmbedder:
    encode_prompts, left padding) on the same sides and the CoTs the reasoner wrote."""
    from elva_jax.eval.embed import Embedder
    from elva_jax.eval.embed_config import EmbedConfig
    from elva_jax.model.config import ModelOptions
    from elva_jax.rl.embed_rl_trainer import FrozenEmbedder

    tok, _, (ecfg, eparams) = models
    gen = _gen(models, tmp_path)
    recs = [
        {"id": "t", "item": {"text": "a red car on a road", "image": None, "instruction": "Find an image."}},
        {"id": "i", "item": {"text": None, "image": image_path, "instruction": None}},
        {"id": "it", "item": {"text": "a scene", "image": image_path, "instruction": None}},
    ]
    cfg = EmbedConfig(batch_size=3, seq_buckets=(256,), media=MEDIA)
    emb = Embedder(
        eparams, ecfg, tok, EmbedConfig(**{**cfg.__dict__, "tcot_request": SUMMARISE}), identity={"t": 1}, cot=gen
    )
    got, _ = emb.compute(recs)
    assert gen.generate_calls == 2  # 3 sides, batches of 2
    cots = gen.cots([r["item"] for r in recs])
    fe = FrozenEmbedder(
        ecfg, ModelOptions(), eparams, tok, request=SUMMARISE, buckets=(256,), media=MEDIA,
    )  # fmt: skip
    want = np.asarray(fe.embed([r["item"] for r in recs], cots))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert not np.allclose(got[1], got[2], atol=1e-3)
    # the CoT matters: another CoT, another embedding
    other = np.asarray(fe.embed([recs[0]["item"]], [cots[0] + " more"]))
    assert not np.allclose(other[0], got[0], atol=1e-4)
    # the CoT settings enter the embedding fingerprint
    assert emb.fingerprint["cot"]["fingerprint_sha"] == gen.fingerprint_sha
    assert emb.fingerprint["embed"]["mode"] == "tcot"


def test_evidence_crops_from_a_known_cot(models, image_path, tmp_path):
    """CoTs written to the cache by hand: a well-formed box becomes an extra image (the crop's pixels), a
    malformed one adds nothing and is counted; the side then embeds with two images."""
    from elva_jax.eval.embed import Embedder
    from elva_jax.eval.embed_config import EmbedConfig

    tok, _, (ecfg, eparams) = models
    good = {"text": None, "image": image_path, "instruction": None}
    bad = {"text": "a scene", "image": image_path, "instruction": None}
    cot_good = (
        '<thinking>the car {"bbox_2d": [250, 100, 500, 900]}</thinking><rethink>yes</rethink><answer>car</answer>'
    )
    cot_bad = '<thinking>{"bbox_2d": [500, 100, 250, 900]}</thinking><rethink>r</rethink><answer>a</answer>'
    ccfg = CoTConfig(**{**CCFG.__dict__, "crops": True})
    g = _gen(models, tmp_path, ccfg)
    with open(g.dir / "cots.jsonl", "w") as f:
        for s, c in ((good, cot_good), (bad, cot_bad)):
            f.write(json.dumps({"key": side_key(s), "cot": c, "truncated": False}) + "\n")
    g = _gen(models, tmp_path, ccfg)  # reads the hand-written lines
    out = g.attach([{"id": "g", "item": good}, {"id": "b", "item": bad}])
    assert g.generate_calls == 0 and g.stats["cached"] == 2
    (crop_path,) = out[0]["item"]["extra_images"]
    arr = np.asarray(Image.open(image_path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(crop_path).convert("RGB")), arr[3:27, 10:20])
    assert "extra_images" not in out[1]["item"] and out[1]["item"]["cot"] == cot_bad
    assert g.stats["unparsable"] == 1 and g.stats["reasons"] == {"bbox_empty": 1}
    assert g.stats["crops"] == 1 and g.stats["sides_without_crop"] == 1
    # embedded with the crop (2 images) vs the same side and CoT without crops
    cfg = dict(batch_size=2, seq_buckets=(256,), media=MEDIA)
    e_crop = Embedder(eparams, ecfg, tok, EmbedConfig(**cfg, tcot_request=SUMMARISE), identity={"t": 1}, cot=g)
    g_plain = _gen(models, tmp_path)
    with open(g_plain.dir / "cots.jsonl", "w") as f:
        f.write(json.dumps({"key": side_key(good), "cot": cot_good, "truncated": False}) + "\n")
    g_plain = _gen(models, tmp_path)
    e_plain = Embedder(eparams, ecfg, tok, EmbedConfig(**cfg, tcot_request=SUMMARISE), identity={"t": 1}, cot=g_plain)
    assert e_crop.fingerprint_sha != e_plain.fingerprint_sha  # crops enter the embedding fingerprint
    a, b = e_crop.compute([{"id": "g", "item": good}])[0], e_plain.compute([{"id": "g", "item": good}])[0]
    assert np.all(np.isfinite(a)) and not np.allclose(a, b, atol=1e-4)


def test_cot_cli_arguments():
    from elva_jax.eval.__main__ import cot_overrides

    assert cot_overrides("reasoner=/r,max_tokens=64,temperature=0.5") == [
        "eval.cot_reasoner=/r",
        "eval.cot_max_tokens=64",
        "eval.cot_temperature=0.5",
    ]
    assert cot_overrides("/r") == ["eval.cot_reasoner=/r"]
    with pytest.raises(SystemExit, match="not one of"):
        cot_overrides("reasoner=/r,bogus=1")
    with pytest.raises(SystemExit, match="needs reasoner"):
        cot_overrides("max_tokens=4")


@pytest.mark.slow
def test_mmeb_cli_with_cot_end_to_end(tmp_path):
    """Every bundled MMEB task (images, visual documents, videos) is scored with CoTs from a random
    reasoner; results.json records the CoT settings and counts; a rerun of two tasks with --cot-crops
    (new embeddings, the same CoTs) generates no CoT."""
    from elva_jax.data.benchmarks.mmeb.bundled import TASKS, generate
    from elva_jax.model.tiny import write_random_checkpoint

    generate(tmp_path / "data", seed=0)
    write_random_checkpoint(str(tmp_path / "embedder"), "tiny_qwen3_vl")
    write_random_checkpoint(str(tmp_path / "reasoner"), "tiny", seed=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elva_jax.eval", "--checkpoint", str(tmp_path / "embedder"), "--benchmark", "mmeb"]
    cmd += [
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--cot",
        f"reasoner={tmp_path / 'reasoner'},max_tokens=6",
    ]
    n_flags = len(cmd)
    cmd += ["data.seq_buckets=[320]", "rl.prompt_buckets=[192]", "data.patch_row_len=64", "model.dtype=float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]) == [t["name"] for t in TASKS]
    for r in res["tasks"].values():
        assert r["status"] == "ok" and 0.0 <= r["score"] <= 1.0, r
    s, c = res["settings"], res["cot"]
    assert s["mode"] == "tcot" and s["cot"]["reasoner"] == str(tmp_path / "reasoner")
    assert s["cot"]["cot"]["max_new_tokens"] == 6 and s["cot"]["evidence"]["crops"] is False
    n_sides = sum(st["n"] for st in res["embedding"].values())
    assert c["generated"] > 0 and c["generated"] + c["cached"] == n_sides
    assert c["unparsable"] == sum(c["reasons"].values()) and c["generate_calls"] > 0
    two = ["--cot-crops", *cmd[n_flags:], "eval.tasks=[Bundled-Grounding, Bundled-VideoRET]"]  # image + video
    p2 = subprocess.run(cmd[:n_flags] + two, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p2.returncode == 0, p2.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    c2 = res2["cot"]
    n2 = sum(st["n"] for st in res2["embedding"].values())
    assert c2["generated"] == 0 and c2["generate_calls"] == 0 and c2["cached"] == n2 > 0
    assert res2["settings"]["cot"]["evidence"]["crops"] is True
    assert res2["settings"]["fingerprint_sha"] != s["fingerprint_sha"]
    assert all(st["computed"] == st["n"] for st in res2["embedding"].values())  # new embeddings
    assert all(r["status"] == "ok" for r in res2["tasks"].values())


def test_key_frames_become_the_frames_the_reasoner_saw(models, tmp_path):
    """A video side's key frames (1-based) become the sampled frames at those positions: the frames
    PyAV decodes at the indices the pipeline's sampling keeps; one out of range adds nothing, counted;
    the side then embeds as a video + 2 images."""
    import av

    from elva_jax.data.benchmarks.mmeb.bundled import generate
    from elva_jax.data.media.video import load_video
    from elva_jax.eval.embed import Embedder
    from elva_jax.eval.embed_config import EmbedConfig

    tok, (rcfg, _), (ecfg, eparams) = models
    generate(tmp_path / "data", seed=0)
    clip = str(next((tmp_path / "data" / "video-tasks" / "Bundled-VideoRET").glob("*.mp4")))
    side = {"text": "a moving square", "image": None, "instruction": None, "video": clip}
    late = {"text": "late", "image": None, "instruction": None, "video": clip}
    cot = '<thinking>{"key_frames": [1, 3]}</thinking><rethink>r</rethink><answer>a square</answer>'
    far = '<thinking>{"key_frames": [99]}</thinking><rethink>r</rethink><answer>a</answer>'
    ccfg = CoTConfig(**{**CCFG.__dict__, "crops": True})
    g = _gen(models, tmp_path, ccfg)
    with open(g.dir / "cots.jsonl", "w") as f:
        for s, c in ((side, cot), (late, far)):
            f.write(json.dumps({"key": side_key(s), "cot": c, "truncated": False}) + "\n")
    g = _gen(models, tmp_path, ccfg)
    out = g.attach([{"id": "v", "item": side}, {"id": "w", "item": late}])
    c = ccfg.media
    idx = load_video(
        clip, rcfg.vision.geometry, fps=c.video_fps, min_frames=c.video_min_frames, max_frames=c.video_max_frames,
        min_pixels=c.video_min_pixels, max_pixels=c.video_max_pixels, max_patches=c.patch_row_len,
    ).frame_indices  # fmt: skip
    with av.open(clip) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    paths = out[0]["item"]["extra_images"]
    assert len(paths) == 2
    for p, k in zip(paths, (1, 3)):
        np.testing.assert_array_equal(np.asarray(Image.open(p).convert("RGB")), frames[int(idx[k - 1])])
    assert "extra_images" not in out[1]["item"] and g.stats["reasons"] == {"key_frame_out_of_range": 1}
    cfg = dict(batch_size=2, seq_buckets=(320,), patch_rows=6, media=MEDIA)
    emb = Embedder(eparams, ecfg, tok, EmbedConfig(**cfg, tcot_request=SUMMARISE), identity={"t": 1}, cot=g)
    e = emb.compute([{"id": "v", "item": side}, {"id": "w", "item": late}])[0]
    assert np.all(np.isfinite(e)) and not np.allclose(e[0], e[1], atol=1e-4)
