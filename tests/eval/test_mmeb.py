"""MMEB-V2: the reader on the bundled set (and on bad input), the scoring against hand-computed cases
(ties, one candidate, NDCG with several and graded relevant documents), and one end-to-end
``python -m elva_jax.eval --benchmark mmeb`` run with a tiny random model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elva_jax.data.benchmarks.mmeb.bundled import TASKS, generate
from elva_jax.data.benchmarks.mmeb.hf import load_dataset_dir
from elva_jax.data.benchmarks.mmeb.reader import SUPPORTED_PARSERS, load_task, task_table
from elva_jax.data.benchmarks.mmeb.tasks import HUB, MMEB_V2_TASKS, MMEBDataError, MMEBTask, Side
from elva_jax.data.benchmarks.mmeb.video_tasks import VIDEO_QA_INSTRUCTION
from elva_jax.eval import mmeb as M
from elva_jax.retrieval.metrics import ndcg_from_topk

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb") / "data"
    generate(root, seed=0)
    return root


# ----------------------------------------------------------------------------------------------------
# NDCG@k and hit@k, hand-computed


def test_ndcg_binary_several_relevant():
    # relevant docs 7 and 9 ranked 1st and 3rd: DCG = 1/log2(2) + 1/log2(4); IDCG = 1 + 1/log2(3)
    got = ndcg_from_topk(np.array([[7, 3, 9, 4, 5]]), [{7: 1, 9: 1}], 5)
    assert got[0] == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)), abs=1e-15)


def test_ndcg_graded_linear_and_exponential():
    # grades b=3, e=1, x=2 (x not retrieved); ranking a b c d e
    rank, grades = np.array([[0, 1, 2, 3, 4]]), [{1: 3.0, 4: 1.0, 6: 2.0}]
    dcg = 3 / math.log2(3) + 1 / math.log2(6)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_from_topk(rank, grades, 5)[0] == pytest.approx(dcg / idcg, abs=1e-15)
    dcg_e = 7 / math.log2(3) + 1 / math.log2(6)
    idcg_e = 7 + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_from_topk(rank, grades, 5, "exponential")[0] == pytest.approx(dcg_e / idcg_e, abs=1e-15)


def test_ndcg_edges():
    assert ndcg_from_topk(np.array([[0, -1, -1]]), [{0: 1}], 5)[0] == 1.0  # one candidate, padded
    assert ndcg_from_topk(np.array([[1, 2, 3, 4, 5, 0]]), [{0: 1}], 5)[0] == 0.0  # relevant at rank 6
    # more relevant documents than k: IDCG counts the best k grades only
    assert ndcg_from_topk(np.array([[0, 1]]), [{0: 1, 1: 1, 2: 1}], 2)[0] == 1.0
    with pytest.raises(ValueError, match="row 0 has no relevant"):
        ndcg_from_topk(np.array([[0, 1]]), [{0: 0.0}], 2)


def _task(modality, n_q, names, relevant, local=None):
    return MMEBTask(
        "t",
        modality,
        "M",
        "p",
        "src",
        [str(i) for i in range(n_q)],
        [Side(text="q")] * n_q,
        [Side(text=n) for n in names],
        list(names),
        relevant,
        local,
    )


def _score(task, S):
    """Embeddings whose inner products are exactly the score matrix S [Q, C]."""
    S = np.asarray(S, dtype=np.float32)
    return M.score_task(task, np.eye(S.shape[0], dtype=np.float32), np.ascontiguousarray(S.T))


def test_local_ties_single_candidate_and_duplicate_names():
    # q0: positive (cand 0) ties the negative -> the earlier row position (the positive) wins: hit
    # q1: its row lists the negative first; a tie then misses
    # q2: a single candidate: always a hit
    # q3: the row repeats the positive's name (same candidate): still one hit; a better negative beats it
    S = [[0.5, 0.5, 0.0], [0.2, 0.2, 0.0], [0.0, 0.0, -1.0], [0.1, 0.3, 0.9]]
    rows = [[0, 1], [1, 0], [2], [0, 1, 0]]
    rel = [{0: 1.0}, {0: 1.0}, {2: 1.0}, {0: 1.0}]
    r = _score(_task("image", 4, ["a", "b", "c"], rel, rows), S)
    assert r["metric"] == "hit@1" and r["score"] == r["hit@1"] == 0.5  # q0 and q2
    assert r["hit@5"] == 1.0


def test_global_ties_go_to_the_lower_candidate_index():
    S = [[0.3, 0.3, 0.1], [0.3, 0.3, 0.1]]
    r = _score(_task("video", 2, ["a", "b", "c"], [{0: 1.0}, {1: 1.0}]), S)
    assert r["hit@1"] == 0.5 and r["hit@5"] == 1.0
    v = _score(_task("visdoc", 2, ["a", "b", "c"], [{1: 2.0, 2: 1.0}, {0: 1.0}]), S)
    # q0 ranking a b c: DCG = 2/log2(3) + 1/log2(4); IDCG = 2 + 1/log2(3); q1: 1
    q0 = (2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3))
    assert v["metric"] == "ndcg_linear@5" and v["score"] == pytest.approx((q0 + 1) / 2, abs=1e-15)


def test_averages_per_meta_task_modality_and_overall():
    per = {
        "a": {"modality": "image", "meta_task": "CLS", "status": "ok", "score": 0.2},
        "b": {"modality": "image", "meta_task": "QA", "status": "ok", "score": 0.6},
        "c": {"modality": "visdoc", "meta_task": "VDRv1", "status": "ok", "score": 0.4},
        "d": {"modality": "video", "meta_task": "CLS", "status": "skipped: video inputs not available", "score": None},
    }
    a = M.averages(per)
    assert a["image/CLS"]["score"] == 0.2 and a["image"]["score"] == pytest.approx(0.4)
    assert a["all"]["score"] == pytest.approx(0.4) and a["all"]["n_tasks"] == 3 and a["all"]["skipped"] == ["d"]
    assert a["video"]["score"] is None and list(a)[-1] == "all"


# ----------------------------------------------------------------------------------------------------
# reader


def test_reader_on_the_bundled_set(bundled, tmp_path):
    specs = task_table(bundled)
    assert [s["name"] for s in specs] == [t["name"] for t in TASKS]
    got = {s["name"]: load_task(s, bundled, materialize_dir=tmp_path) for s in specs}
    cls = got["Bundled-ColourCLS"]
    assert cls.eval_type == "local" and len(cls.queries) == 6 and len(cls.candidates) == 6
    for row, rel in zip(cls.local, cls.relevant):
        assert list(rel) == [row[0]]  # the positive first
    assert cls.queries[0].instruction == "Represent the given image for classification"  # <|image_1|> removed
    assert Path(cls.queries[0].image).is_file()
    qa = got["Bundled-ShapeQA"]  # written as parquet
    assert qa.cand_names == ["circle", "square", "triangle"] and qa.queries[0].text == "What shape is shown?"
    vg = got["Bundled-Grounding"]
    assert vg.cand_names[0].endswith("vg/0_crop0.png:") and all(Path(c.image).is_file() for c in vg.candidates)
    doc = got["Bundled-DocRetrieval"]
    assert doc.eval_type == "global" and len(doc.candidates) == 8
    named = [{doc.cand_names[i]: g for i, g in rel.items()} for rel in doc.relevant]
    assert named[0] == {"page0": 2.0, "page5": 1.0} and named[5] == {"page5": 1.0}  # score-0 judgement dropped
    # VLM2Vec's candidate order: each query's qrels documents (query order), then the rest of the corpus
    assert doc.cand_names == ["page0", "page5", "page1", "page6", "page2", "page7", "page3", "page4"]
    assert all(Path(c.image).is_file() and Path(c.image).parent == tmp_path / doc.name for c in doc.candidates)
    mot = got["Bundled-VideoMotion"]
    assert mot.has_video and mot.cand_names == [f"moving {d}" for d in ("left", "right", "up", "down")]
    assert mot.queries[0].instruction == "Recognize the motion in the video."  # the manifest's
    assert all(Path(q.video).is_file() for q in mot.queries)
    ret = got["Bundled-VideoRET"]
    assert ret.eval_type == "global" and ret.relevant == [{0: 1.0}, {1: 1.0}, {2: 1.0}]
    mom = got["Bundled-MomentRET"]  # frame folders: the whole video as the query's, 3 segments as clips
    assert mom.eval_type == "local" and mom.local == [[0, 1, 2], [3, 4, 5]] and mom.relevant == [{2: 1.0}, {5: 1.0}]
    assert mom.queries[0].text == "the green square moves right"
    assert [len(list(Path(x.video).iterdir())) for x in (mom.queries[0], *mom.candidates[:3])] == [12, 4, 4, 4]


def test_bundled_clips_decode(bundled):
    import av

    with av.open(str(bundled / "video-tasks" / "Bundled-VideoMotion" / "clip1.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
    # the square moves right: its mean column grows
    cols = [np.nonzero((f.astype(int).sum(-1) < 600).any(0))[0].mean() for f in frames]
    assert cols == sorted(cols) and cols[-1] - cols[0] > 15


def test_reader_errors(bundled, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local HF cache
    with pytest.raises(MMEBDataError, match="no MMEB task found"):
        task_table(tmp_path)
    (tmp_path / "image" / "ImageNet-1K").mkdir(parents=True)
    spec = task_table(tmp_path)[0]
    with pytest.raises(MMEBDataError, match=r"image/ImageNet-1K: neither a save_to_disk"):
        load_task(spec, tmp_path)
    missing = {"name": "OK-VQA", "modality": "image", "meta_task": "QA", "parser": "image_qa"}
    with pytest.raises(MMEBDataError, match=r"image/OK-VQA not found and ziyjiang/MMEB_Test_Instruct .* local HF"):
        load_task(missing, tmp_path)
    import huggingface_hub

    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.is_offline_mode()
    import datasets

    datasets.Dataset.from_dict({"qry_inst": ["x"], "qry_text": ["y"], "qry_img_path": [""]}).save_to_disk(
        str(tmp_path / "image" / "GQA")
    )
    gqa = {"name": "GQA", "modality": "image", "meta_task": "QA", "parser": "image_qa"}
    with pytest.raises(MMEBDataError, match=r"image/GQA: column 'tgt_text' missing"):
        load_task(gqa, tmp_path)


def test_unsupported_parser_is_reported_skipped(bundled, tmp_path):
    """Every MMEB-V2 task has a parser now; a manifest can still name one this reader lacks."""
    from elva_jax.data.prepare import prepare_mmeb

    assert {p for _, _, p in MMEB_V2_TASKS.values()} <= set(SUPPORTED_PARSERS)
    root = tmp_path / "d"
    root.mkdir()
    spec = {"name": "GUI-Grounding", "modality": "image", "meta_task": "VG", "parser": "gui"}
    (root / "mmeb_tasks.json").write_text(json.dumps({"tasks": [spec]}))
    assert M.load_tasks(root) == [spec]
    s = prepare_mmeb(str(root), str(tmp_path / "out"), log=lambda x: None)
    assert s["tasks"] == [] and s["skipped"] == {"GUI-Grounding": "parser 'gui' not implemented"}


# ----------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_mmeb_cli_end_to_end(bundled, tmp_path):
    from elva_jax.model.tiny import write_random_checkpoint

    write_random_checkpoint(str(tmp_path / "ckpt"), "tiny")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "elva_jax.eval", "--checkpoint", str(tmp_path / "ckpt"), "--benchmark", "mmeb"]
    cmd += ["--data", str(bundled), "--out", str(out), "data.seq_buckets=[160]", "data.patch_row_len=64"]
    cmd += ["model.dtype=float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert list(tasks) == [t["name"] for t in TASKS]
    for r in tasks.values():  # video tasks included: the embedder takes video records
        assert r["status"] == "ok" and 0.0 <= r["score"] <= 1.0
        assert r["score"] == r["ndcg_linear@5" if r["modality"] == "visdoc" else "hit@1"]
    scored = [r["score"] for r in tasks.values()]
    a = res["averages"]
    assert a["all"]["score"] == pytest.approx(np.mean(scored)) and a["all"]["n_tasks"] == 9
    assert a["image/RET"]["score"] == pytest.approx(
        np.mean([tasks[n]["score"] for n in ("Bundled-T2I", "Bundled-I2T")])
    )
    assert a["video"]["n_tasks"] == 3 and not a["video"]["skipped"] and a["video/MRET"]["n_tasks"] == 1
    md = (out / "results.md").read_text()
    assert "| Bundled-VideoRET | video | RET | hit@1 |" in md and "**Overall**" in md
    # the embedding cache: a second scoring of one task reads every embedding back
    p2 = subprocess.run(cmd + ["eval.tasks=[Bundled-ShapeQA]"], capture_output=True, text=True, env=env, timeout=900)
    assert p2.returncode == 0, p2.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    assert res2["tasks"]["Bundled-ShapeQA"]["score"] == tasks["Bundled-ShapeQA"]["score"]
    assert res2["embedding"] and all(st["computed"] == 0 for st in res2["embedding"].values()), res2["embedding"]


def test_hf_cache_fallback_goes_through_load_dataset(bundled, tmp_path, monkeypatch):
    # a task absent under the root is read with datasets.load_dataset(hub id) in offline mode; here the
    # "hub id" is a local directory of parquet files, which load_dataset resolves the same way
    import datasets

    repo = tmp_path / "repo"
    repo.mkdir()
    src = load_dataset_dir(bundled / "image" / "Bundled-ColourCLS")
    src.to_parquet(str(repo / "test-00000-of-00001.parquet"))
    monkeypatch.setitem(HUB, "ImageNet-1K", (str(repo), None, "test"))
    seen = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(a) or real(*a, **k))
    spec = {"name": "ImageNet-1K", "modality": "image", "meta_task": "CLS", "parser": "image_cls"}
    t = load_task(spec, bundled)  # bundled/image/ImageNet-1K does not exist
    assert seen == [(str(repo), None)] and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert t.cand_names == load_task(TASKS[0], bundled).cand_names and len(t.queries) == 6


def test_default_mmeb_root_is_the_generated_bundled_set(tmp_path):
    from elva_jax.eval.benchmarks import mmeb_root
    from elva_jax.eval.runner import load_config

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "eval.benchmark=mmeb"])
    root = mmeb_root(cfg, None)
    assert root == tmp_path / "run" / "mmeb_bundled" and [t["name"] for t in task_table(root)] == [
        t["name"] for t in TASKS
    ]
    assert mmeb_root(cfg, None) == root  # found, not regenerated


def test_load_tasks_max_queries_keeps_every_candidate(bundled, tmp_path):
    full = {t.name: t for t in M.load_tasks(bundled, ["Bundled-T2I", "Bundled-DocRetrieval"], materialize_dir=tmp_path)}
    cut = M.load_tasks(bundled, ["Bundled-T2I", "Bundled-DocRetrieval"], materialize_dir=tmp_path, max_queries=2)
    for t in cut:
        f = full[t.name]
        assert t.query_ids == f.query_ids[:2] and t.relevant == f.relevant[:2] and t.cand_names == f.cand_names
        assert t.local == (None if f.local is None else f.local[:2])


def test_records_digest_names_the_video_and_keeps_image_digests():
    from elva_jax.eval.embed_cache import records_digest

    img = [{"id": "a", "item": {"text": "t", "image": "x.png", "instruction": None}}]
    import hashlib

    old = hashlib.sha256(json.dumps(["a", "t", "x.png", None]).encode() + b"\n").hexdigest()  # the digest before
    assert records_digest(img) == old
    v1 = [{"id": "a", "item": {"text": "t", "image": None, "instruction": None, "video": "1.mp4"}}]
    v2 = [{"id": "a", "item": {"text": "t", "image": None, "instruction": None, "video": "2.mp4"}}]
    assert records_digest(v1) != records_digest(v2)


class _FakeEmbedder:
    """Embeds a record as a fixed random vector of its side (the same side -> the same vector)."""

    def __init__(self):
        self.stats, self.seen = {}, []

    def embed(self, records, name, **kw):
        self.seen += records
        out = []
        for r in records:
            key = json.dumps(r["item"], sort_keys=True)
            out.append(np.random.default_rng(abs(hash(key)) % 2**32).standard_normal(4))
        return np.asarray(out, dtype=np.float32)


def test_video_tasks_are_skipped_only_without_video_inputs(bundled, tmp_path, monkeypatch):
    tasks = M.load_tasks(bundled, ["Bundled-VideoRET", "Bundled-ShapeQA"], materialize_dir=tmp_path)
    assert M.video_inputs_available()  # the embedder takes video records
    monkeypatch.setattr(M.Embedder, "video_inputs", False)
    fake = _FakeEmbedder()
    res = M.evaluate_tasks(tasks, fake, {}, log=lambda s: None)
    assert res["tasks"]["Bundled-VideoRET"]["status"] == "skipped: video inputs not available"
    assert res["tasks"]["Bundled-VideoRET"]["score"] is None and res["averages"]["all"]["n_tasks"] == 1
    assert not any("video" in r["item"] for r in fake.seen)  # nothing of the video task was embedded
    monkeypatch.undo()
    fake = _FakeEmbedder()
    res = M.evaluate_tasks(tasks, fake, {}, log=lambda s: None)
    r = res["tasks"]["Bundled-VideoRET"]
    assert r["status"] == "ok" and r["metric"] == "hit@1" and res["averages"]["video/RET"]["n_tasks"] == 1
    videos = [x["item"]["video"] for x in fake.seen if "video" in x["item"]]
    assert len(videos) == 3 and all(Path(v).is_file() and v.endswith(".mp4") for v in videos)


@pytest.fixture(scope="module")
def tiny_model():
    import jax

    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config

    cfg = preset_config("tiny")
    return cfg, init_params(cfg, jax.random.key(0)), Tokenizer.from_dir()


@pytest.mark.parametrize("mode", ["eol", "ret", "instruct_last"])
def test_bundled_video_tasks_are_embedded_and_scored(bundled, tmp_path, tiny_model, mode):
    """A tiny random model embeds the bundled video tasks (video queries / candidates) in each mode and
    they are scored; a video query's embedding equals a forward over the direct path's inputs
    (load_video + encode_video_prompt + collate + build_inputs) and depends on the clip."""
    from elva_jax.data.media.settings import MediaSettings
    from elva_jax.eval.embed import Embedder
    from elva_jax.eval.embed_config import EmbedConfig

    cfg, params, tok = tiny_model
    ecfg = EmbedConfig(
        mode=mode, batch_size=4, seq_buckets=(160,), media=MediaSettings(patch_row_len=64), summary_tokens=3
    )
    emb = Embedder(params, cfg, tok, ecfg, identity={"test": 1}, log=lambda s: None)
    names = ["Bundled-VideoMotion", "Bundled-VideoRET", "Bundled-MomentRET"]  # the last from frame folders
    tasks = M.load_tasks(bundled, names, materialize_dir=tmp_path)
    res = M.evaluate_tasks(tasks, emb, {}, log=lambda s: None)
    for name in names:
        r = res["tasks"][name]
        assert r["status"] == "ok" and r["metric"] == "hit@1" and 0.0 <= r["score"] <= 1.0, r
    assert res["averages"]["video"]["n_tasks"] == 3 and not res["averages"]["video"]["skipped"]
    motion = next(t for t in tasks if t.name == "Bundled-VideoMotion")
    recs = [{"id": f"q{i}", "item": q.item()} for i, q in enumerate(motion.queries[:2])]
    e = emb.compute(recs)[0]
    assert np.all(np.isfinite(e)) and not np.allclose(e[0], e[1], atol=1e-4)  # two clips, two embeddings
    if mode == "ret":
        return
    import jax

    from elva_jax.data.encoding import collate
    from elva_jax.data.media.video import load_video
    from elva_jax.data.prompts import instruct_prompt, lamra_prompt
    from elva_jax.model.backbone import forward
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.embedding import eol_embedding, last_token_embedding
    from elva_jax.model.inputs import build_inputs

    side = recs[0]["item"]
    geo = cfg.vision.geometry
    v = load_video(side["video"], geo, fps=2.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=50176)
    if mode == "eol":
        p = lamra_prompt(side["text"], 0, side["instruction"], n_videos=1)
    else:
        p = instruct_prompt(side["text"], 0, side["instruction"], n_videos=1)
    row = tok.encode_video_prompt(p, [v])
    row.update(pixel_values_videos=v.patches, video_grid_thw=v.grid_thw[None], second_per_grid_ts=[v.second_per_grid_t])
    x = build_inputs(cfg, ModelOptions(), **collate([row], tok.pad_token_id), rows=1, row_len=64)
    h = forward(params, jax.tree.map(np.asarray, x), cfg, ModelOptions()).hidden
    if mode == "eol":
        want = eol_embedding(h, x["input_ids"], tok.emb_token_id, x["attention_mask"])
    else:
        want = last_token_embedding(h, x["attention_mask"])
    np.testing.assert_allclose(e[0], np.asarray(want)[0], atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# more of VLM2Vec's video loaders, each on hand-written rows


def _video_spec(tmp_path, name, parser, cols):
    import datasets

    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "video" / name))
    return {"name": name, "modality": "video", "meta_task": "X", "parser": parser}


@pytest.mark.parametrize(
    "parser,cols,files,query,inst",
    [
        (
            "msvd",
            {"video_id": ["a", "b"], "video": ["x/a.avi", "b.avi"], "caption": [["c1", "alt"], ["c2"]]},
            ["x/a.avi", "b.avi"],
            "c1",
            "Find the video snippet that corresponds to the given summary:",
        ),
        (
            "didemo",
            {"video": ["d/v1.mp4", "d/v2.mp4"], "caption": ["s1", "s2"]},
            ["v1.mp4", "v2.mp4"],
            "s1",
            "Find a video that includes the following described scenes:",
        ),
        (
            "vatex",
            {"videoID": ["k1", "k2"], "enCap": [["e1", "e1b"], ["e2"]]},
            ["k1.mp4", "k2.mp4"],
            "e1",
            "Select a video that fits the description provided:",
        ),
        (
            "youcook2",
            {"id": ["y1", "y2"], "video_path": ["p/q/y1.mp4", "p/y2.mp4"], "sentence": ["cut", "fry"]},
            ["y1.mp4", "y2.mp4"],
            "cut",
            "Find a video that demonstrates the following action while making a recipe:",
        ),
    ],
)
def test_video_retrieval_parsers(tmp_path, parser, cols, files, query, inst):
    t = load_task(_video_spec(tmp_path, "T", parser, cols), tmp_path)
    root = tmp_path / "video-tasks" / "T"
    assert [c.video for c in t.candidates] == [str(root / f) for f in files]
    assert all(
        c.instruction == "Understand the content of the provided video." and c.text is None for c in t.candidates
    )
    assert t.queries[0].text == query and t.queries[0].instruction == inst and t.queries[0].video is None
    assert t.local is None and t.relevant == [{0: 1.0}, {1: 1.0}] and t.has_video
    ids = [Path(f).stem for f in files] if parser == "didemo" else cols[next(iter(cols))]
    assert t.cand_names == ids


def test_ssv2_parser_is_local_over_each_rows_labels(tmp_path):
    cols = {
        "video_id": [7, 8],
        "pos_text": ["Opening something", "Closing something"],
        "neg_text": [["Closing something", "Opening something"], ["Closing something", "Folding something"]],
    }
    spec = {**_video_spec(tmp_path, "SmthSmthV2", "ssv2", cols), "parser": MMEB_V2_TASKS["SmthSmthV2"][2]}
    t = load_task(spec, tmp_path)
    assert t.cand_names == ["Closing something", "Opening something", "Folding something"]
    assert t.local == [[0, 1], [0, 2]] and t.relevant == [{1: 1.0}, {0: 1.0}]
    assert t.queries[0].video.endswith("video-tasks/SmthSmthV2/7.mp4")
    assert (
        t.queries[0].instruction
        == "What actions or object interactions are being performed by the person in the video?"
    )
    bad = {**cols, "pos_text": ["Nope", "Closing something"]}
    with pytest.raises(MMEBDataError, match=r"row 0: pos_text 'Nope' is not among"):
        load_task(_video_spec(tmp_path / "b", "S2", "ssv2", bad), tmp_path / "b")


def test_video_qa_parsers(tmp_path):
    nq = {
        "video": [11],
        "question": ["why?"],
        "answer": [2],
        "qid": [0],
        "type": ["CW"],
        **{f"a{k}": [f"opt{k}"] for k in range(5)},
    }
    t = load_task(_video_spec(tmp_path, "NExTQA", "nextqa", nq), tmp_path)
    q = t.queries[0]
    assert q.text == "why?\nOptions:\n(A) opt0\n(B) opt1\n(C) opt2\n(D) opt3\n(E) opt4"
    assert q.instruction == VIDEO_QA_INSTRUCTION and q.video.endswith("video-tasks/NExTQA/11.mp4")
    assert t.cand_names == [f"opt{k}" for k in range(5)] and [c.text for c in t.candidates] == t.cand_names
    assert t.local == [[0, 1, 2, 3, 4]] and t.relevant == [{2: 1.0}]
    eg = {
        "video_idx": ["vid9"],
        "question": ["What does c do?"],
        "answer": ["1"],
        "question_idx": ["q"],
        "option": [["A. c cooks.", "B. c reads a book.", "C. c sleeps."]],
    }
    t = load_task(_video_spec(tmp_path, "EgoSchema", "egoschema", eg), tmp_path)
    assert t.queries[0].text == "What does c do?A. c cooks. B. c reads a book. C. c sleeps."
    assert [c.text for c in t.candidates] == ["c cooks", "c reads a book", "c sleeps"]
    assert t.cand_names == eg["option"][0] and t.relevant == [{1: 1.0}]
    an = {
        "video_name": ["abc", "def"],
        "question": ["is it raining", "is it day"],
        "answer": ["no", "yes"],
        "question_id": ["1", "2"],
    }
    t = load_task(_video_spec(tmp_path, "ActivityNetQA", "activitynetqa", an), tmp_path)
    assert t.queries[0].text == "is it raining? (A) yes; (B) no." and t.queries[1].video.endswith("/v_def.mp4")
    assert t.cand_names == ["yes", "no"] and t.local == [[0, 1], [0, 1]] and t.relevant == [{1: 1.0}, {0: 1.0}]
    with pytest.raises(MMEBDataError, match=r"row 0: answer 'maybe' does not name one of the 2 options"):
        load_task(
            _video_spec(tmp_path / "b", "A2", "activitynetqa", {**an, "answer": ["maybe", "yes"]}), tmp_path / "b"
        )


def _png_folder(d, n, h=32, w=48):
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(d / f"{i + 1}.png")
    return d


MVB_ROWS = {
    "episodic_reasoning": {
        "video": ["s01e02_seg01"],
        "question": ["Who speaks first?"],
        "candidates": [["Ross", "Monica", "Joey"]],
        "answer": ["Monica"],
    },
    "action_antonym": {
        "video": ["123.webm"],
        "question": ["What is the action?"],
        "candidates": [["pushing", "pulling"]],
        "answer": ["pulling"],
    },
}


def test_mvbench_parser_per_subset_or_one_table(tmp_path):
    import datasets

    pytest.importorskip("av")
    from elva_jax.data.media.video import load_video

    spec = {"name": "MVBench", "modality": "video", "meta_task": "QA", "parser": MMEB_V2_TASKS["MVBench"][2]}
    assert spec["parser"] == "mvbench"
    a = tmp_path / "a"
    for sub in ("action_antonym", "episodic_reasoning"):  # written out of table order
        datasets.Dataset.from_dict(MVB_ROWS[sub]).save_to_disk(str(a / "video" / "MVBench" / sub))
    b = tmp_path / "b"
    rows = {k: MVB_ROWS["episodic_reasoning"][k] + MVB_ROWS["action_antonym"][k] for k in MVB_ROWS["action_antonym"]}
    datasets.Dataset.from_dict({**rows, "subset": ["episodic_reasoning", "action_antonym"]}).save_to_disk(
        str(b / "video" / "MVBench")
    )
    for root in (a, b):
        t = load_task(spec, root)
        v = root / "video-tasks" / "MVBench"
        q0, q1 = t.queries
        assert q0.text == "Who speaks first?\nOptions:\n(A) Ross\n(B) Monica\n(C) Joey"
        assert q0.instruction == q1.instruction == VIDEO_QA_INSTRUCTION
        assert q0.video == str(v / "tvqa/frames_fps3_hq/s01e02_seg01") and q0.video_fps == 3.0
        assert q1.video == str(v / "ssv2_video/123.webm") and q1.video_fps is None and "video_fps" not in q1.item()
        assert q0.item()["video_fps"] == 3.0
        assert t.cand_names == ["(A) Ross", "(B) Monica", "(C) Joey", "(A) pushing", "(B) pulling"]
        assert [c.text for c in t.candidates] == t.cand_names
        assert t.local == [[0, 1, 2], [3, 4]] and t.relevant == [{1: 1.0}, {4: 1.0}] and t.eval_type == "local"
    # the episodic_reasoning frame folder decodes at the subset's 3 fps: 9 frames = 3 s, 2 fps -> 6 frames,
    # stride 9 / 6 = 1.5 -> 0 1 3 4 6 7
    _png_folder(Path(q0.video), 9)
    got = load_video(q0.video, fps=2.0, folder_fps=q0.video_fps, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    assert got.frame_indices.tolist() == [0, 1, 3, 4, 6, 7] and got.video_fps == 3.0
    bad = tmp_path / "c"
    datasets.Dataset.from_dict({**MVB_ROWS["action_antonym"], "answer": ["waving"]}).save_to_disk(
        str(bad / "video" / "MVBench" / "action_antonym")
    )
    with pytest.raises(MMEBDataError, match=r"row 0: answer 'waving' is not one of its candidates"):
        load_task(spec, bad)
    datasets.Dataset.from_dict(MVB_ROWS["action_antonym"]).save_to_disk(str(tmp_path / "d" / "video" / "MVBench"))
    with pytest.raises(MMEBDataError, match="one directory per subset"):
        load_task(spec, tmp_path / "d")


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_moment_retrieval_parser_ranks_each_querys_clips(tmp_path):
    """QVHighlight / Charades-STA: {video root}/{video}/ holds the query video and the clips (frame folders
    or files); local over the clips, the 'positive*' one relevant; scored hit@1."""
    cols = {"query": ["a man opens a door", "a dog runs"], "video_path": ["videos/vidA.mp4", "vidB.mp4"]}
    spec = {**_video_spec(tmp_path, "QVHighlight", "moment_retrieval", cols), "meta_task": "MRET"}
    assert MMEB_V2_TASKS["QVHighlight"][2] == MMEB_V2_TASKS["Charades-STA"][2] == "moment_retrieval"
    v = tmp_path / "video-tasks" / "QVHighlight"
    for clip in ("query", "positive", "negative_10", "negative_2"):
        (v / "vidA" / clip).mkdir(parents=True)
    _touch(v / "vidA" / "notes.txt")  # not a clip
    for f in ("vidB/positive_1.mp4", "vidB/negative_3.avi", "vidB.mp4"):
        _touch(v / f)
    t = load_task(spec, tmp_path)
    assert t.cand_names == [
        "vidA/negative_2",
        "vidA/negative_10",
        "vidA/positive",
        "vidB/negative_3",
        "vidB/positive_1",
    ]
    assert [c.video for c in t.candidates] == [
        str(v / p) for p in ("vidA/negative_2", "vidA/negative_10", "vidA/positive", "vidB/negative_3.avi")
    ] + [str(v / "vidB/positive_1.mp4")]
    assert all(c.instruction == "Understand the content of the provided video." and not c.text for c in t.candidates)
    q0, q1 = t.queries
    assert (q0.text, q0.video) == ("a man opens a door", str(v / "vidA/query")) and q1.video == str(v / "vidB.mp4")
    assert q0.instruction == "Find the clip that corresponds to the described scene in the given video:"
    assert t.local == [[0, 1, 2], [3, 4]] and t.relevant == [{2: 1.0}, {4: 1.0}]
    # hit@1 by hand: query 0's best clip is its positive, query 1's a negative
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    c = np.array([[0, 1], [0.5, 0.5], [1, 0], [0, 1], [0.6, 0.8]], np.float32)
    r = M.score_task(t, q, c)
    assert r["metric"] == "hit@1" and r["score"] == 0.5 and r["hit@5"] == 1.0
    (v / "vidB" / "positive_2").mkdir()
    with pytest.raises(MMEBDataError, match=r"row 1: .*vidB needs exactly one 'positive\*' clip"):
        load_task(spec, tmp_path)
    _touch(v / "vidA" / "positive.mp4")
    with pytest.raises(MMEBDataError, match=r"row 0: clip 'positive' of .*vidA is both"):
        load_task(spec, tmp_path)


def test_prepare_mmeb_copies_frame_folders_and_mvbench_subsets(tmp_path):
    import datasets

    from elva_jax.data.prepare import prepare_mmeb

    src = tmp_path / "src"
    for sub, rows in MVB_ROWS.items():
        datasets.Dataset.from_dict(rows).save_to_disk(str(src / "video" / "MVBench" / sub))
    v = src / "video-tasks" / "MVBench"
    _png_folder(v / "tvqa/frames_fps3_hq/s01e02_seg01", 3)
    _touch(v / "ssv2_video/123.webm")
    cols = {"query": ["a man opens a door"], "video_path": ["vidA.mp4"]}
    _video_spec(src, "Charades-STA", "moment_retrieval", cols)
    for clip in ("query", "positive", "negative_1"):
        _png_folder(src / "video-tasks" / "Charades-STA" / "vidA" / clip, 2)
    s = prepare_mmeb(str(src), str(tmp_path / "out"), log=lambda x: None)
    assert s["tasks"] == ["MVBench", "Charades-STA"] and s["media"] == {"copied": 5, "missing": 0}
    for spec in task_table(tmp_path / "out"):
        a, b = load_task(spec, src), load_task(spec, tmp_path / "out")
        assert _sides(a, src, "/nomat") == _sides(b, tmp_path / "out", "/nomat") and a.cand_names == b.cand_names
    assert len(list((tmp_path / "out/video-tasks/MVBench/tvqa/frames_fps3_hq/s01e02_seg01").iterdir())) == 3


def test_momentseeker_parser_text_image_and_video_queries(tmp_path):
    def clips(*paths):
        return [{"output_path": p, "start": 0.0} for p in paths]

    cols = {
        "query": ["q text", "q video", "q image"],
        "input_frames": ["", "mv/in.mp4", "x.jpg"],
        "positive_frames": [clips("m/a.mp4"), clips("m/b.mp4", "m/d.mp4"), clips("m/c.mp4")],
        "negative_frames": [clips("m/b.mp4", "m/c.mp4"), clips("m/a.mp4"), []],
    }
    spec = {**_video_spec(tmp_path, "MomentSeeker", MMEB_V2_TASKS["MomentSeeker"][2], cols), "meta_task": "MRET"}
    v = tmp_path / "video-tasks" / "MomentSeeker"
    (v / "video_frames" / "m_b").mkdir(parents=True)  # a clip whose frames are saved: read from them
    (v / "video_frames" / "mv_in").mkdir(parents=True)
    t = load_task(spec, tmp_path)
    assert t.cand_names == ["m_a", "m_b", "m_c", "m_d"]
    assert [c.video for c in t.candidates] == [str(v / "m/a.mp4"), str(v / "video_frames/m_b")] + [
        str(v / "m/c.mp4"),
        str(v / "m/d.mp4"),
    ]
    assert all(c.instruction == "Understand the content of the provided video clip." for c in t.candidates)
    q = t.queries
    assert (q[0].text, q[0].video, q[0].image) == ("q text", None, None)
    assert q[0].instruction == "Find the clip that corresponds to the given text:"
    assert q[1].video == str(v / "video_frames/mv_in")
    assert q[1].instruction == "Find the clip that corresponds to the given sentence and video segment:"
    assert q[2].image == str(v / "query_x.jpg") and q[2].video is None
    assert q[2].instruction == "Select the video clip that aligns with the given text and image:"
    assert t.local == [[0, 1, 2], [1, 3, 0], [2]] and t.relevant == [{0: 1.0}, {1: 1.0, 3: 1.0}, {2: 1.0}]
    # hit@1 with two positives: query 1's top clip is its second positive (m_d) -> a hit
    qe = np.eye(4, dtype=np.float32)[[1, 3, 2]]
    ce = np.eye(4, dtype=np.float32)
    ce[0] = [0, 0.9, 0, 0.1]  # query 0 ranks m_a (its positive) below m_b
    r = M.score_task(t, qe, ce)
    assert r["score"] == pytest.approx(2 / 3)
    bad = {**cols, "positive_frames": [[], *cols["positive_frames"][1:]]}
    with pytest.raises(MMEBDataError, match="row 0: no positive clip"):
        load_task(_video_spec(tmp_path / "b", "MomentSeeker", "momentseeker", bad), tmp_path / "b")


# ----------------------------------------------------------------------------------------------------
# python -m elva_jax.data.prepare --mmeb


def _sides(task, root, mat):
    """A task's sides with its root and materialize directory replaced by placeholders."""

    def rel(f):
        return f and f.replace(str(mat), "<mat>").replace(str(root), "<root>")

    return [(x.text, rel(x.image), rel(x.video), x.instruction) for x in task.queries + task.candidates]


def test_prepare_mmeb_writes_a_self_contained_copy(bundled, tmp_path, capsys):
    from elva_jax.data.prepare import main as prepare_main

    out = tmp_path / "copy"
    assert prepare_main(["--mmeb", "--root", str(bundled), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"prepared {len(TASKS)} MMEB tasks" in printed and "0 missing" in printed
    assert [t["name"] for t in task_table(out)] == [t["name"] for t in TASKS]
    for spec in TASKS:
        a = load_task(spec, bundled, materialize_dir=tmp_path / "ma")
        b = load_task(spec, out, materialize_dir=tmp_path / "mb")
        assert (a.query_ids, a.cand_names, a.relevant, a.local) == (b.query_ids, b.cand_names, b.relevant, b.local)
        assert _sides(a, bundled, tmp_path / "ma") == _sides(b, out, tmp_path / "mb")
        for s in b.queries + b.candidates:  # every file the copy names is inside it
            for f in (s.image, s.video):
                assert f is None or (Path(f).exists() and (str(out) in f or str(tmp_path / "mb") in f))


def test_prepare_mmeb_counts_missing_media_and_reads_named_tasks_from_the_hf_cache(bundled, tmp_path, monkeypatch):
    import shutil

    from elva_jax.data.prepare import prepare_mmeb

    src = tmp_path / "src"
    shutil.copytree(bundled, src)
    gone = next((src / "video-tasks" / "Bundled-VideoRET").glob("*.mp4"))
    gone.unlink()
    s = prepare_mmeb(str(src), str(tmp_path / "o1"), tasks=["Bundled-VideoRET"], log=lambda x: None)
    assert s["tasks"] == ["Bundled-VideoRET"] and s["media"]["missing"] == 1 and s["missing_media"] == [str(gone)]
    # a named MMEB-V2 task absent under the root comes from the HF cache (a local parquet "hub id" here)
    repo = tmp_path / "repo"
    repo.mkdir()
    load_dataset_dir(bundled / "image" / "Bundled-ColourCLS").to_parquet(str(repo / "test-00000-of-00001.parquet"))
    monkeypatch.setitem(HUB, "ImageNet-1K", (str(repo), None, "test"))
    s = prepare_mmeb(str(src), str(tmp_path / "o2"), tasks=["ImageNet-1K"], log=lambda x: None)
    assert s["tasks"] == ["ImageNet-1K"] and s["skipped"] == {} and s["media"]["copied"] > 0
    t = load_task(task_table(tmp_path / "o2")[0], tmp_path / "o2")
    assert t.name == "ImageNet-1K" and all(Path(q.image).is_file() for q in t.queries)
    with pytest.raises(MMEBDataError, match="unknown MMEB task 'Nope'"):
        prepare_mmeb(str(src), str(tmp_path / "o3"), tasks=["Nope"], log=lambda x: None)
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_mmeb(str(src), str(tmp_path / "o2"), log=lambda x: None)
