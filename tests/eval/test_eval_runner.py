"""End-to-end evaluation on the bundled multi-grain set with a tiny random model: reports, cache reuse,
both embedding modes, grain masking, and clear errors for bad inputs.

Oracles: dense numpy scores + the sort-free ``recall_at_k`` (not the streaming top-k path) for the
metrics; an unpadded single-row generate + forward (positions from ``build_inputs``) for the "ret"
embedding of the batched, left-aligned path.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from elva_jax.data.benchmarks.multigrain.generator import generate as generate_data
from elva_jax.data.errors import DataFormatError
from elva_jax.data.media.settings import MediaSettings
from elva_jax.eval import tasks as T
from elva_jax.eval.embed import Embedder
from elva_jax.eval.embed_cache import CacheError, PartedArray
from elva_jax.eval.embed_config import EmbedConfig
from elva_jax.eval.runner import evaluate
from elva_jax.model.tiny import write_random_checkpoint
from elva_jax.retrieval.metrics import recall_at_k

BASE = [
    "data.seq_buckets=[160]",
    "data.patch_row_len=64",
    "model.dtype=float32",
    "model.position_mode=mrope",
    "eval.grain_masking=false",  # independent of the preset; tests that want it turn it on
]
ROW64 = MediaSettings(patch_row_len=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrun")
    generate_data(d / "data", seed=0, n_train=2, n_test=6)
    write_random_checkpoint(str(d / "ckpt"), "tiny")
    return d


def _run(env, out, *over, logs=None):
    log = logs.append if logs is not None else (lambda s: None)
    return evaluate(
        None,
        checkpoint=str(env / "ckpt"),
        overrides=[*BASE, f"eval.data_root={env / 'data'}", f"eval.out={out}", *over],
        log=log,
    )


def _check_results(res, out):
    for f in ("results.json", "results.md", "recall.png"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"] == json.loads(json.dumps(res["tasks"]))
    for r in res["tasks"].values():
        assert 0.0 <= r["recall_at_k"] <= 1.0 and 0.0 <= r["mrr"] <= 1.0
        assert r["recall_at_k"] == r["recall"][str(r["k"])]
        rs = [r["recall"][k] for k in ("1", "5", "10", "50")]
        assert rs == sorted(rs) and rs[-1] == 1.0  # the pool (24) is smaller than 50: whole pool ranked
    avg = np.mean([r["recall_at_k"] for r in res["tasks"].values()])
    assert res["averages"]["all"]["recall_at_k"] == pytest.approx(avg)
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in res["tasks"]) and "**Average**" in md
    with Image.open(out / "recall.png") as im:
        assert im.format == "PNG" and im.width > 200


def test_eol_bundled_end_to_end_with_cache_and_grain_masking(env):
    out = env / "out_eol"
    logs: list[str] = []
    res = _run(env, out, "eval.grain_masking=true", logs=logs)
    _check_results(res, out)
    s = res["settings"]
    assert s["mode"] == "eol" and s["pool"] == "local" and "crc32" in s["instruction_rule"]
    assert {r["group"] for r in res["tasks"].values()} == {"bundled", "mrbench"}
    assert set(res["averages"]) == {"bundled", "mrbench", "all"}
    assert any("items/s" in line for line in logs)
    gm = res["grain_masking"]
    assert np.isfinite(gm["mean_cosine_distance"]) and 0.0 <= gm["mean_cosine_distance"] <= 2.0
    assert gm["n_queries"] > 0 and gm["n_phrases"] > gm["n_queries"]
    assert "Grain masking" in (out / "results.md").read_text()

    # metrics against dense scores + the sort-free reference, from the cached embeddings
    task = T.load_task(T.bundled_tasks(env / "data")[0])
    by_name = {k.split(".")[1]: k for k in res["embedding"]}
    cache = env / "out_eol" / "cache" / s["fingerprint_sha"][:12]
    q = np.asarray(PartedArray([cache / by_name["multigrain_task0"] / "part-00000.npy"], 64))
    c = np.asarray(PartedArray([cache / by_name["mbeir_multigrain_task0_cand_pool"] / "part-00000.npy"], 64))
    rel = np.zeros((len(q), len(c)), bool)
    for i, r in enumerate(task.relevant):
        rel[i, r] = True
    assert res["tasks"]["multigrain_task0"]["recall_at_k"] == pytest.approx(recall_at_k(q @ c.T, rel, 5))

    # rerun: every embedding comes from the cache, results identical
    logs2: list[str] = []
    res2 = _run(env, out, "eval.grain_masking=true", logs=logs2)
    assert all(v["computed"] == 0 and v["reused"] == v["n"] for v in res2["embedding"].values())
    assert not any("items/s" in line for line in logs2)
    assert res2["tasks"] == res["tasks"] and res2["grain_masking"] == res["grain_masking"]

    # before/after report
    res3 = _run(env, env / "out_cmp", f"eval.compare_to={out / 'results.json'}", f"eval.cache_dir={out / 'cache'}")
    assert "R@K before" in (env / "out_cmp" / "results.md").read_text()
    assert all(v["computed"] == 0 for v in res3["embedding"].values())


def test_ret_mode_end_to_end_and_cache(env):
    out = env / "out_ret"
    over = (
        "eval.mode=ret",
        "eval.summary_tokens=4",
        "eval.tasks=[multigrain_task1, multigrain_task7, mrbench_multigrain_task3]",
    )
    res = _run(env, out, *over, "eval.grain_masking=true", "eval.grain_max_queries=2")
    _check_results(res, out)
    emb = res["settings"]["embedding"]
    assert emb["mode"] == "ret" and emb["summary"] == {
        "max_new_tokens": 4,
        "sampling": "greedy",
        "rule": "greedy (top_k=1)",
    }
    assert set(res["tasks"]) == {"multigrain_task1", "multigrain_task7", "mrbench_multigrain_task3"}
    assert 0.0 <= res["grain_masking"]["mean_cosine_distance"] <= 2.0
    summaries = list((out / "cache").rglob("part-00000.summaries.json"))
    assert summaries and len(json.loads(summaries[0].read_text())["summaries"]) > 0
    res2 = _run(env, out, *over, "eval.grain_masking=true", "eval.grain_max_queries=2")
    assert all(v["computed"] == 0 for v in res2["embedding"].values())
    assert res2["tasks"] == res["tasks"]


def test_ret_embedding_equals_unpadded_generate_and_forward(env):
    """Batched left-aligned generation + teacher forcing == one unpadded row with positions from scratch."""
    import jax

    from elva_jax.data.encoding import PromptEncoder
    from elva_jax.data.media.image_processing import load_image, preprocess_image
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model import backbone
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.embedding import l2_normalize
    from elva_jax.model.hf_checkpoint import load_params
    from elva_jax.model.inputs import build_inputs
    from elva_jax.model.sampler import generate

    cfg, params = load_params(str(env / "ckpt"))
    tok = Tokenizer.from_dir()
    ecfg = EmbedConfig(mode="ret", batch_size=4, seq_buckets=(160,), media=ROW64, summary_tokens=5)
    emb = Embedder(params, cfg, tok, ecfg, identity={"test": 1}, log=lambda s: None)
    specs = T.bundled_tasks(env / "data")
    t7 = T.load_task(specs[4], max_queries=1)  # (i,t)->i: an image + text query
    recs = T.query_records(t7, None, T.InstructionRule(False))[0]
    long_text = " and ".join(["a large red circle at the top left"] * 8)
    recs.append({"id": "long", "item": {"text": long_text, "image": None, "instruction": None}})
    got, summaries = emb.compute(recs)  # one batch; the image row is left-padded to the long text row
    recs = recs[:1]
    enc = PromptEncoder(tok, "ret", generation=True)
    opts = ModelOptions()
    gen = jax.jit(
        lambda p, x: generate(
            p, x, jax.random.key(0), cfg, opts, ecfg.sampler_config(), num_samples=1,
            stop_ids=(tok.ret_token_id, 151645), ret_id=tok.ret_token_id, pad_id=tok.pad_token_id,
        )
    )  # fmt: skip
    fwd = jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts).hidden[:, -1])
    for i, r in enumerate(recs):
        pv = grid = None
        if r["item"]["image"]:
            pv, grid = preprocess_image(load_image(r["item"]["image"]))
            grid = np.asarray(grid).reshape(1, 3)
        ids = enc.encode(r["item"], pv, grid, 160)[0]["input_ids"][None]
        x = build_inputs(cfg, opts, ids, None, pv, grid)
        s = gen(params, x)
        n = int(s.lengths[0])
        full = np.concatenate([ids, np.asarray(s.tokens)[:, :n]], 1)
        assert full[0, -1] == tok.ret_token_id
        want = np.asarray(l2_normalize(fwd(params, build_inputs(cfg, opts, full, None, pv, grid))))[0]
        np.testing.assert_allclose(got[i], want, atol=2e-5)
        assert summaries[i] == tok.decode(np.asarray(s.tokens)[0, : n - 1], skip_special_tokens=True)


def _triple(env, name, *, qrels_extra="", empty_pool=False):
    """A zero-shot triple copied from bundled task 1 (text only, 3 queries)."""
    d = env / name
    d.mkdir()
    src = env / "data"
    lines = (src / "query/test/mbeir_multigrain_task1_test.jsonl").read_text().splitlines()[:3]
    (d / "q.jsonl").write_text("\n".join(lines) + "\n")
    qids = {json.loads(x)["qid"] for x in lines}
    qrels = [x for x in (src / "qrels/test/mbeir_multigrain_task1_test_qrels.txt").read_text().splitlines()]
    (d / "qrels.txt").write_text("\n".join(x for x in qrels if x.split()[0] in qids) + "\n" + qrels_extra)
    if empty_pool:
        (d / "pool.jsonl").write_text("")
    else:
        shutil.copy(src / "cand_pool/local/mbeir_multigrain_task1_cand_pool.jsonl", d / "pool.jsonl")
    return f"eval.zeroshot_tasks=['{name}:{d}/q.jsonl:{d}/pool.jsonl:{d}/qrels.txt']", d


def test_bad_inputs_give_clear_errors(env):
    task, d = _triple(env, "bad_qrels", qrels_extra="10:2 0 10:999999 1 1\n")
    with pytest.raises(DataFormatError, match=r"qrels\.txt, line \d+: did '10:999999'.*not in the candidate pool"):
        _run(env, env / "o1", "eval.benchmark=zeroshot", task)
    task, d = _triple(env, "empty_pool", empty_pool=True)
    with pytest.raises(DataFormatError, match=r"pool\.jsonl, line 1: candidate pool is empty"):
        _run(env, env / "o2", "eval.benchmark=zeroshot", task)
    with pytest.raises(T.EvalDataError, match="query file .*nope.jsonl not found"):
        _run(env, env / "o3", "eval.benchmark=zeroshot", f"eval.zeroshot_tasks=['x:{d}/nope.jsonl:{d}/q.jsonl:{d}/q']")
    from elva_jax.eval.__main__ import main

    with pytest.raises(SystemExit, match="error: .*empty_pool/pool.jsonl, line 1: candidate pool is empty"):
        main(
            [
                "--checkpoint",
                str(env / "ckpt"),
                "--out",
                str(env / "o4"),
                "--task",
                f"e:{d}/q.jsonl:{d}/pool.jsonl:{d}/qrels.txt",
                *BASE,
            ]
        )


def test_missing_or_corrupt_cache_part(env):
    task, _ = _triple(env, "zs")
    out = env / "o_cache"
    over = ("eval.benchmark=zeroshot", task, "eval.part_size=8")
    res = _run(env, out, *over)
    assert res["tasks"]["zs"]["n_candidates"] == 24
    parts = sorted((out / "cache").rglob("pool.*/part-*.npy"))
    assert len(parts) == 3  # 24 candidates in parts of 8
    parts[1].unlink()
    with pytest.raises(CacheError, match=r"part-00001\.npy: .*finished.* is missing; rerun with cache=repair"):
        _run(env, out, *over)
    logs: list[str] = []
    res2 = _run(env, out, *over, "eval.cache=repair", logs=logs)
    pool_stats = next(v for k, v in res2["embedding"].items() if k.startswith("pool."))
    assert pool_stats["computed"] == 8 and pool_stats["reused"] == 16
    assert any("is missing: recomputing" in line for line in logs)
    assert res2["tasks"] == res["tasks"]
    # an interrupted run (part never recorded as finished) resumes without complaint
    index_path = parts[0].parent / "index.json"
    index = json.loads(index_path.read_text())
    del index["parts"]["00001"]
    index_path.write_text(json.dumps(index))
    parts[1].unlink()
    res3 = _run(env, out, *over)
    pool_stats = next(v for k, v in res3["embedding"].items() if k.startswith("pool."))
    assert pool_stats["computed"] == 8 and res3["tasks"] == res["tasks"]
    data = bytearray(parts[2].read_bytes())
    data[-1] ^= 0xFF
    parts[2].write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"part-00002\.npy: .*corrupt \(sha256 mismatch\)"):
        _run(env, out, *over)


def test_cache_of_another_model_is_refused(env, tmp_path):
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.hf_checkpoint import load_params

    cfg, params = load_params(str(env / "ckpt"))
    tok = Tokenizer.from_dir()
    recs = [{"id": f"t{i}", "item": {"text": f"text number {i}", "image": None, "instruction": None}} for i in range(3)]
    ecfg = EmbedConfig(batch_size=2, seq_buckets=(64,))
    a = Embedder(params, cfg, tok, ecfg, identity={"checkpoint": "A"}, log=lambda s: None)
    first = np.asarray(a.embed(recs, name="set", cache_dir=tmp_path))
    assert np.allclose(first, a.compute(recs)[0], atol=1e-6)
    b = Embedder(params, cfg, tok, ecfg, identity={"checkpoint": "B"}, log=lambda s: None)
    with pytest.raises(CacheError, match=r"index\.json: cache written for another model.*identity\.checkpoint"):
        b.embed(recs, name="set", cache_dir=tmp_path)
    with pytest.raises(CacheError, match="other records"):
        a.embed(recs[:2], name="set", cache_dir=tmp_path)


def test_task_definitions_and_instruction_rules(env):
    specs = T.mbeir_tasks("/m")
    assert len(specs) == 16 and len({s.name for s in specs}) == 16
    assert {s.name for s in specs if s.k == 10} == {"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"}
    coco = next(s for s in specs if s.name == "mscoco_task0")
    assert coco.pool_file.as_posix() == "/m/cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"
    assert coco.query_file.as_posix() == "/m/query/test/mbeir_mscoco_task0_test.jsonl"
    assert coco.qrels_file.as_posix() == "/m/qrels/test/mbeir_mscoco_task0_test_qrels.txt"
    assert coco.global_pool_file.as_posix() == "/m/cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    cirr = next(s for s in specs if s.name == "cirr_task7")
    assert cirr.pool_file.name == "mbeir_cirr_task7_cand_pool.jsonl"
    bundled = T.bundled_tasks(env / "data")
    assert [s.name for s in bundled[:5]] == [f"multigrain_task{t}" for t in (0, 1, 3, 4, 7)]
    assert [s.group for s in bundled[5:]] == ["mrbench"] * 4
    with pytest.raises(T.EvalDataError, match="unknown task"):
        T.select_tasks(bundled, ["nope"])
    from elva_jax.data.benchmarks.mbeir import read_instructions

    lt = T.load_task(bundled[0])
    ins = read_instructions(env / "data" / "instructions/query_instructions.tsv")
    fixed, summ = T.query_records(lt, ins, T.InstructionRule(fixed_index=2))
    assert summ["prompt_counts"] == {"2": len(lt.queries)} and "fixed" in summ["rule"]
    seeded = [T.query_records(lt, ins, T.InstructionRule(seed=7))[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert (
        T.mask_phrase("a small red circle at the top", {"phrase": "red", "span": None}) == "a small circle at the top"
    )


# ----------------------------------------------------------------------------------------------------
# Qwen3-VL-Embedding's convention ("instruct_last") on a tiny random Qwen3-VL


@pytest.fixture(scope="module")
def qwen3_ckpt(env):
    d = env / "ckpt_qwen3_vl"
    write_random_checkpoint(str(d), "tiny_qwen3_vl")
    return d


def test_instruct_last_embedding_equals_unpadded_last_token_forward(env, qwen3_ckpt):
    """Right-padded batches (text and image rows of different lengths) == one unpadded row's L2-normalised
    final hidden state at its last token (the "\\n" after <|im_start|>assistant)."""
    import jax

    from elva_jax.data.encoding import PromptEncoder
    from elva_jax.data.media.image_processing import load_image, preprocess_image
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model import backbone
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.embedding import l2_normalize
    from elva_jax.model.hf_checkpoint import load_params
    from elva_jax.model.inputs import build_inputs

    cfg, params = load_params(str(qwen3_ckpt))
    tok = Tokenizer.from_dir(geometry=cfg.vision.geometry)
    ecfg = EmbedConfig(mode="instruct_last", batch_size=4, seq_buckets=(160,), media=ROW64)
    emb = Embedder(params, cfg, tok, ecfg, identity={"test": 1}, log=lambda s: None)
    specs = T.bundled_tasks(env / "data")
    with_img = T.query_records(T.load_task(specs[4], max_queries=1), None, T.InstructionRule(False))[0]  # (i,t)
    img_cand = T.candidate_records(T.load_task(specs[0], max_queries=1))[:1]  # an image candidate
    recs = [
        {"id": "q", "item": {"text": "a small red circle", "image": None, "instruction": "Find the image."}},
        {**with_img[0], "item": {**with_img[0]["item"], "instruction": "Edit the image."}},
        *img_cand,
        {"id": "long", "item": {"text": " and ".join(["a large red circle"] * 8), "image": None, "instruction": None}},
    ]
    got, summaries = emb.compute(recs)  # one right-padded batch of 4
    assert summaries is None and got.shape == (4, cfg.text.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    enc = PromptEncoder(tok, "instruct_last")
    opts = ModelOptions()
    fwd = jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts).hidden[:, -1])
    for i, r in enumerate(recs):
        pv = grid = None
        if r["item"]["image"]:
            pv, grid = preprocess_image(load_image(r["item"]["image"]), geometry=cfg.vision.geometry)
            grid = np.asarray(grid).reshape(1, 3)
        ids = enc.encode(r["item"], pv, grid, 160)[0]["input_ids"]
        assert tok.decode(ids[-3:]) == "<|im_start|>assistant\n"
        want = np.asarray(l2_normalize(fwd(params, build_inputs(cfg, opts, ids[None], None, pv, grid))))[0]
        np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_instruct_last_cli_end_to_end_and_cache_identity(env, qwen3_ckpt):
    from elva_jax.eval.__main__ import main

    out = env / "out_instruct"
    argv = [
        "--checkpoint",
        str(qwen3_ckpt),
        "--mode",
        "instruct_last",
        "--out",
        str(out),
        *BASE,
        f"eval.data_root={env / 'data'}",
        "eval.tasks=[multigrain_task1, multigrain_task7]",
        "eval.max_queries=2",
    ]
    res = main(argv)
    _check_results(res, out)
    s = res["settings"]
    assert s["mode"] == "instruct_last" and s["embedding"]["default_instruction"] == "Represent the user's input."
    assert "last real token" in s["embedding"]["embedding"]
    assert set(res["tasks"]) == {"multigrain_task1", "multigrain_task7"}
    assert all(r["n_queries"] == 2 for r in res["tasks"].values())
    res2 = main(argv)  # every embedding from the cache
    assert all(v["computed"] == 0 and v["reused"] == v["n"] for v in res2["embedding"].values())
    assert res2["tasks"] == res["tasks"]
    # the convention and its default instruction are part of the cache identity
    other = main([*argv, "data.default_instruction=Represent the candidate."])
    assert other["settings"]["fingerprint_sha"] != s["fingerprint_sha"]
    assert all(v["reused"] == 0 for v in other["embedding"].values())
    eol = main([*argv[:2], "--mode", "eol", *argv[4:]])
    assert eol["settings"]["fingerprint_sha"] not in (s["fingerprint_sha"], other["settings"]["fingerprint_sha"])


def test_weights_swapped_at_the_same_path_size_and_mtime_change_the_cache_identity(env, tmp_path):
    """The cache is keyed on the weights' content: new weights written over the old file, with its
    size and modification time restored, do not reuse the old embeddings."""
    import os
    import shutil

    from elva_jax.eval.checkpoints import checkpoint_identity

    d = tmp_path / "ck"
    shutil.copytree(env / "ckpt", d)
    f = d / "model.safetensors"
    st = os.stat(f)
    before = checkpoint_identity(d, None)
    write_random_checkpoint(str(tmp_path / "other"), "tiny", seed=1)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    assert checkpoint_identity(d, None) != before


def test_auto_mode_follows_the_export_record_and_every_output_names_the_mode(env, capsys):
    """eval.mode auto (the default): [RET] for a checkpoint whose export record says the RL stage trained it,
    EOL without a record; results.json, results.md and the console say which mode and why. --tie-order faiss
    reaches the top-k and is recorded."""
    from elva_jax.eval.__main__ import main
    from elva_jax.model.hf_checkpoint import EXPORT_INFO, write_export_info

    ckpt = env / "ckpt"
    # the same tasks and summary length as test_ret_mode_end_to_end_and_cache: its cache serves the embeddings
    argv = [
        "--checkpoint",
        str(ckpt),
        "--tie-order",
        "faiss",
        *BASE,
        f"eval.data_root={env / 'data'}",
        "eval.summary_tokens=4",
        "eval.tasks=[multigrain_task1, multigrain_task7, mrbench_multigrain_task3]",
        f"eval.cache_dir={env / 'out_ret' / 'cache'}",
    ]
    write_export_info(str(ckpt), trained_by="rl", embedding="ret", stages=("contrastive", "rl"))
    try:
        res = main([*argv, f"eval.out={env / 'out_auto'}"])
    finally:
        (ckpt / EXPORT_INFO).unlink()
    s = res["settings"]
    assert s["mode"] == "ret" and s["embedding"]["mode"] == "ret" and "rl stage" in s["mode_source"]
    assert s["tie_order"] == "faiss"
    on_disk = json.loads((env / "out_auto" / "results.json").read_text())["settings"]
    assert on_disk["mode"] == "ret" and on_disk["mode_source"] == s["mode_source"]
    md = (env / "out_auto" / "results.md").read_text()
    assert "(ret embedding" in md and f"- mode: ret ({s['mode_source']})" in md and "ties: faiss" in md
    console = capsys.readouterr().out
    assert "embedding mode ret (auto:" in console and "(ret embedding, auto:" in console

    # no record: EOL, said as such; an explicit --mode is reported as given
    res = main(
        [
            *argv[:2],
            *BASE,
            f"eval.data_root={env / 'data'}",
            "eval.tasks=[multigrain_task1]",
            f"eval.out={env / 'out_auto_eol'}",
        ]
    )
    assert res["settings"]["mode"] == "eol" and "no elva_export.json" in res["settings"]["mode_source"]
    (ckpt / EXPORT_INFO).write_text("{not json")
    try:
        with pytest.raises(SystemExit, match="unreadable export record"):
            main([*argv[:2], *BASE, f"eval.data_root={env / 'data'}", f"eval.out={env / 'out_bad'}"])
        res = main(
            [
                *argv[:2],
                "--mode",
                "eol",
                *BASE,
                f"eval.data_root={env / 'data'}",
                "eval.tasks=[multigrain_task1]",
                f"eval.out={env / 'out_auto_eol'}",
            ]
        )
        assert res["settings"]["mode"] == "eol" and res["settings"]["mode_source"] == "eval.mode / --mode"
    finally:
        (ckpt / EXPORT_INFO).unlink()
