"""Record sources: local files, an HF datasets directory and ArrayRecord shards give the same records and
bit-identical batches; resume, host slicing and the bad-input policy behave the same on each; gs://
paths go through the same code (an in-process fake of epath's backend); prepare and the schema field."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from helpers.epath_fake import fake_bucket

from elva_jax import configlib
from elva_jax.data.benchmarks import mbeir, nli
from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.errors import ImageError, ShardRecordError, SourceError
from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline
from elva_jax.data.prepare import main as prepare_main
from elva_jax.data.prepare import prepare
from elva_jax.data.progress import Progress
from elva_jax.data.records import (
    ContrastiveRecords,
    CorpusRecords,
    NLIRecords,
    contrastive_records,
    corpus_records,
    nli_records,
)
from elva_jax.data.sources import open_source
from elva_jax.model.tiny import preset_config
from elva_jax.schema import RunConfig

Q = "query/train/mbeir_multigrain_union_train.jsonl"
POOL = "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"
INS = "instructions/query_instructions.tsv"
NLI = "nli/multigrain_nli_train.csv"
BASE = PipelineConfig(
    batch_size=4,
    micro_batches=2,
    seq_buckets=(64, 128, 256),
    patch_budget=(4, 256),
    cand_patch_budget=(8, 256),
    num_negatives=1,
    seed=0,
    process_index=0,
    process_count=1,
)
KINDS = ("files", "array_record", "hf")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("src")
    mg = base / "mg"
    generate(mg, seed=0)
    prepare(str(mg), str(base / "ar"), fmt="array_record", rows_per_shard=50, log=lambda _: None)
    prepare(str(mg), str(base / "hf"), fmt="hf", log=lambda _: None)
    return {"files": str(mg), "array_record": str(base / "ar"), "hf": str(base / "hf"), "base": base}


@pytest.fixture(scope="module")
def encoder():
    from elva_jax.data.encoding import PromptEncoder
    from elva_jax.data.tokenize import Tokenizer

    return PromptEncoder(Tokenizer.from_dir(), "eol")


@pytest.fixture(scope="module")
def model_cfg():
    return preset_config("tiny")


def _view(root, kind, k=1, **kw):
    src = open_source(root, kind, **kw)
    return ContrastiveRecords(
        src.queries(Q), src.pool(POOL), src.image_root, instructions=src.instructions(INS), num_negatives=k
    )


def _reference(root, k=1):
    """Today's list builder over the files: the oracle every source is held to."""
    qs, pool = mbeir.read_queries(f"{root}/{Q}"), mbeir.read_pool(f"{root}/{POOL}")
    return contrastive_records(qs, pool, root, instructions=mbeir.read_instructions(f"{root}/{INS}"), num_negatives=k)


def _strip(rec):
    keep = ("text", "image", "instruction")
    return {
        "id": rec["id"],
        "query": {k: rec["query"][k] for k in keep},
        "cands": [{k: c[k] for k in keep} for c in rec["cands"]],
    }


def _batches(records, encoder, model_cfg, n, kind="contrastive", **kw):
    it = make_pipeline(records, encoder, model_cfg, dataclasses.replace(BASE, **kw), kind=kind)
    out = []
    for _ in range(n):
        out.append((next(it), list(it.last_ids)))
    return out, it


def _same(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_records_match_the_file_readers_and_carry_the_image_bytes(roots):
    ref = _reference(roots["files"])
    for kind in KINDS:
        view = _view(roots[kind], kind)
        recs = [view[i] for i in range(len(view))]
        assert [_strip(r) for r in recs] == ref, kind
    ar = _view(roots["array_record"], "array_record")
    r = ar[5]
    for side in [r["query"], *r["cands"]]:
        if side["image"] is not None:  # the stored bytes are the file's bytes
            assert side["image_bytes"] == open(side["image"], "rb").read()
            assert ".array_record, record " in side["where"]


def test_batches_are_bit_identical_across_sources(roots, encoder, model_cfg):
    ref, _ = _batches(_reference(roots["files"]), encoder, model_cfg, 3)
    for kind in KINDS:
        got, it = _batches(_view(roots[kind], kind), encoder, model_cfg, 3)
        for (b, ids), (rb, rids) in zip(got, ref, strict=True):
            assert ids == rids and _same(b, rb), kind
        assert it.stats.images > 0
    assert ref[0][0]["cand"]["patches"].any()  # the comparison covered real patches


def test_nli_batches_are_identical_across_sources(roots, encoder, model_cfg):
    rows = nli.read_nli_csv(f"{roots['files']}/{NLI}")
    cfg = dict(num_negatives=1, patch_budget=None, cand_patch_budget=None)
    ref, _ = _batches(nli_records(rows, num_negatives=1), encoder, model_cfg, 2, **cfg)
    for kind in KINDS:
        src = open_source(f"{roots['files']}/{NLI}" if kind == "files" else roots[kind], kind)
        got, _ = _batches(NLIRecords(src.nli(), num_negatives=1), encoder, model_cfg, 2, **cfg)
        assert all(i == ri and _same(b, rb) for (b, i), (rb, ri) in zip(got, ref, strict=True)), kind


def test_mrbench_corpora_through_every_source(roots, encoder, model_cfg, tmp_path):
    """An MRBench directory (image paths relative to its M-BEIR root) prepared with --image-root: the
    eval corpora (pool, queries with their instruction) match corpus_records and batch identically."""
    mr = f"{roots['files']}/mrbench"
    name = "mbeir_multigrain_task3"
    qf, pf = f"query/test/{name}_test.jsonl", f"cand_pool/local/{name}_cand_pool.jsonl"
    prepare(mr, str(tmp_path / "mr"), fmt="array_record", image_root=roots["files"], log=lambda _: None)
    ins = mbeir.read_instructions(f"{roots['files']}/{INS}")
    pool = list(mbeir.read_pool(f"{mr}/{pf}").values())
    ref_pool = corpus_records(pool, roots["files"])
    ref_q = corpus_records(mbeir.read_queries(f"{mr}/{qf}"), roots["files"], instructions=ins, cand_modality="text")
    cfg = dict(shuffle=False, batch_size=4, micro_batches=1, patch_budget=(4, 256))
    ref, _ = _batches(ref_pool, encoder, model_cfg, 2, kind="corpus", **cfg)
    src = open_source(str(tmp_path / "mr"), "array_record")
    got_pool = CorpusRecords(src.pool(pf), src.image_root)
    got_q = CorpusRecords(src.queries(qf), src.image_root, queries=True, instructions=ins, cand_modality="text")

    def strip(recs):
        return [{"id": r["id"], "item": {k: r["item"][k] for k in ("text", "image", "instruction")}} for r in recs]

    assert strip(got_pool) == ref_pool and strip(got_q) == ref_q
    assert any(r["item"]["instruction"] for r in ref_q)
    it = make_pipeline(got_pool, encoder, model_cfg, dataclasses.replace(BASE, **cfg), kind="corpus")
    for b, ids in ref:
        assert _same(next(it), b) and it.last_ids == ids


def _steps(records, encoder, model_cfg, cfg, n_hosts, n_steps, state=None):
    its = [
        make_pipeline(records, encoder, model_cfg, dataclasses.replace(cfg, process_index=h, process_count=n_hosts))
        for h in range(n_hosts)
    ]
    for it in its if state is not None else ():
        it.set_state(state)
    steps = []
    for _ in range(n_steps):
        hosts = []
        for it in its:
            next(it)
            hosts.append(list(it.last_ids))
        steps.append(hosts)
    return steps, its[0].get_state()


def test_host_slicing_and_resume_are_the_same_on_every_source(roots, encoder, model_cfg):
    cfg = dataclasses.replace(BASE, micro_batches=1, batch_size=4, num_epochs=2)
    ref, _ = _steps(_reference(roots["files"]), encoder, model_cfg, cfg, 1, 3)
    for kind in KINDS:
        recs = _view(roots[kind], kind)
        first, state = _steps(recs, encoder, model_cfg, dataclasses.replace(cfg, batch_size=2), 2, 1)
        rest, _ = _steps(recs, encoder, model_cfg, cfg, 1, 2, state)  # saved on 2 hosts, resumed on 1
        got = [sorted(i for h in s for i in h) for s in first + rest]
        assert got == [sorted(s[0]) for s in ref], kind


@pytest.fixture(scope="module")
def broken(roots):
    """A copy of the bundled set with one image deleted and one truncated, prepared both ways."""
    base = roots["base"]
    root = base / "broken"
    shutil.copytree(roots["files"], root)
    recs = _reference(str(root))
    missing = recs[0]["cands"][0]["image"]
    corrupt = next(c["image"] for r in recs[1:4] for c in r["cands"] if c["image"] and c["image"] != missing)
    os.remove(missing)
    with open(corrupt, "r+b") as f:
        f.truncate(40)
    prepare(str(root), str(base / "broken_ar"), fmt="array_record", rows_per_shard=50, log=lambda _: None)
    prepare(str(root), str(base / "broken_hf"), fmt="hf", log=lambda _: None)
    return {"files": str(root), "array_record": str(base / "broken_ar"), "hf": str(base / "broken_hf")}, missing


def test_bad_images_follow_the_same_policy_on_every_source(broken, encoder, model_cfg):
    roots, missing = broken
    skip = ImagePolicy("skip", max_skip_fraction=0.5, min_seen=1)
    kw = dict(shuffle=False, image_policy=skip, micro_batches=1)
    n = 2  # the bad images are in records 0-3 (the first batch); the second batch has its substitutes
    ref, ref_it = _batches(_reference(roots["files"]), encoder, model_cfg, n, **kw)
    assert ref_it.stats.skipped >= 2  # both bad images are used by some records (one by several)
    for kind in KINDS:
        got, it = _batches(_view(roots[kind], kind), encoder, model_cfg, n, **kw)
        assert it.stats.skipped == ref_it.stats.skipped and it.stats.seen == ref_it.stats.seen, kind
        assert all(i == ri and _same(b, rb) for (b, i), (rb, ri) in zip(got, ref, strict=True)), kind
    # fail: the message names the image and, for prepared sources, the shard and record holding it
    fail = dict(shuffle=False, micro_batches=1)
    with pytest.raises(ImageError, match="image file not found"):
        _batches(_reference(roots["files"]), encoder, model_cfg, 1, **fail)
    with pytest.raises(ImageError, match=r"was missing when .*array_record, record \d+ was prepared"):
        _batches(_view(roots["array_record"], "array_record"), encoder, model_cfg, 1, **fail)
    with pytest.raises(ImageError, match=r"\.hf, row \d+ was prepared"):
        _batches(_view(roots["hf"], "hf"), encoder, model_cfg, 1, **fail)


def test_a_malformed_record_names_its_shard_and_index(roots, tmp_path):
    import msgpack
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    out = tmp_path / "ar"
    shutil.copytree(roots["array_record"], out)
    j = _view(str(out), "array_record").cand_rows[0][0]  # the pool row of record 0's positive
    shard, k = _view(str(out), "array_record").pool.where(j).split(", record ")
    k = int(k)
    reader = ArrayRecordReader(shard)
    recs = [reader.read() for _ in range(reader.num_records())]
    reader.close()
    other = k + 1 if k + 1 < len(recs) else k - 1
    recs[k] = msgpack.packb({x: v for x, v in msgpack.unpackb(recs[k]).items() if x != "modality"}, use_bin_type=True)
    recs[other] = b"\xc1 not msgpack"
    w = ArrayRecordWriter(shard, "group_size:1")
    for r in recs:
        w.write(r)
    w.close()
    view = _view(str(out), "array_record")
    with pytest.raises(ShardRecordError, match=rf"{shard}, record {k}: missing field\(s\) \['modality'\]"):
        view[0]
    with pytest.raises(ShardRecordError, match=rf"{shard}, record {other}: not a msgpack row"):
        view.pool[j + other - k]


# ----------------------------------------------------------------------------------------------------
# gs:// through etils.epath, with an in-process fake bucket


def test_gs_paths_read_through_epath(roots, encoder, model_cfg, tmp_path):
    ref, _ = _batches(_reference(roots["files"]), encoder, model_cfg, 2)
    bucket = roots["base"]  # gs://bucket/<name> is roots["base"]/<name>
    with fake_bucket(bucket) as calls:
        # files source: jsonl, instructions and every image opened through epath
        files = _view("gs://bucket/mg", "files")
        got, _ = _batches(files, encoder, model_cfg, 2)
        assert all(i == ri and _same(b, rb) for (b, i), (rb, ri) in zip(got, ref, strict=True))
        assert files[0]["query"]["image"] is None or files[0]["query"]["image"].startswith("gs://bucket/mg/")
        n_files = calls["n"]
        assert n_files > 20  # the pool, queries and images were read from the bucket
        # prepared shards: staged once into the cache through epath, then read by ArrayRecord / Arrow
        for kind in ("array_record", "hf"):
            view = _view(f"gs://bucket/{'ar' if kind == 'array_record' else 'hf'}", kind, cache_dir=str(tmp_path))
            got, _ = _batches(view, encoder, model_cfg, 2)
            assert all(i == ri and _same(b, rb) for (b, i), (rb, ri) in zip(got, ref, strict=True)), kind
        assert calls["n"] > n_files
        # prepare writes to a gs:// output through epath too
        prepare(None, "gs://bucket/nli_out", fmt="array_record", nli_files=(f"{roots['files']}/{NLI}",), log=print)
    assert os.path.exists(bucket / "nli_out" / "manifest.json")
    rows = nli.read_nli_csv(f"{roots['files']}/{NLI}")
    table = open_source(str(bucket / "nli_out"), "array_record").nli()
    assert [(table[i]["sent0"], table[i]["sent1"], table[i]["hard_neg"]) for i in range(len(table))] == rows


def test_open_table_reads_parquet_hf_and_array_record_locally_and_from_gs(roots, tmp_path):
    """Generic tables for other layouts (MMEB-style parquet): rows by index equal pyarrow's own rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elva_jax.data.tables import open_table

    rows = [{"id": i, "text": f"t{i}", "image": bytes([i, 255 - i]) * 3, "tags": ["a"] * (i % 3)} for i in range(7)]
    d = roots["base"] / "pq"
    d.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), d / "part-1.parquet")
    oracle = pa.concat_tables([pq.read_table(d / f"part-{k}.parquet") for k in (0, 1)]).to_pylist()
    assert oracle == rows
    t = open_table(str(d), cache_dir=str(tmp_path / "c1"))
    assert len(t) == 7 and [t[i] for i in range(7)] == rows
    with fake_bucket(roots["base"]):
        g = open_table("gs://bucket/pq", cache_dir=str(tmp_path / "c2"))
        assert [g[i] for i in range(7)] == rows and g.path.startswith(str(tmp_path / "c2"))
        g1 = open_table("gs://bucket/pq/part-1.parquet", cache_dir=str(tmp_path / "c3"))
        assert [g1[i] for i in range(3)] == rows[4:]
    hf_dir = open_source(roots["hf"], "hf").queries(Q).path
    ar_dir = os.path.dirname(open_source(roots["array_record"], "array_record").pool(POOL).shards[0])
    assert open_table(hf_dir)[0]["qid"] == _reference(roots["files"])[0]["id"]
    pool_rows = len(mbeir.read_pool(f"{roots['files']}/{POOL}"))
    assert len(open_table(ar_dir)) > pool_rows  # every table's shards of the directory, read as one
    with pytest.raises(SourceError, match="no HF dataset"):
        open_table(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# prepare CLI, the schema field, wrong roots, progress lines


def test_prepare_cli_counts_missing_images(broken, tmp_path, capsys):
    roots, missing = broken
    assert prepare_main(["--root", roots["files"], "--out", str(tmp_path / "o"), "--rows-per-shard", "64"]) == 0
    out = capsys.readouterr().out
    assert "1 missing" in out and missing in out
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(roots["files"], str(tmp_path / "o"))


def test_prepare_as_a_module_writes_an_hf_directory(roots, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "nli_hf"
    csv = f"{roots['files']}/{NLI}"
    cmd = [sys.executable, "-m", "elva_jax.data.prepare", "--nli", csv, "--out", str(out), "--format", "hf"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    table = open_source(str(out), "hf").nli()
    assert [(table[i]["sent0"], table[i]["sent1"], table[i]["hard_neg"]) for i in range(len(table))] == (
        nli.read_nli_csv(csv)
    )


def test_source_field_is_validated(roots):
    with pytest.raises(configlib.ConfigError, match=r"data\.source.*'gcs' is not one of"):
        configlib.load(RunConfig, None, ["data.source=gcs"])
    with pytest.raises(configlib.ConfigError, match=r"data\.source"):
        configlib.load(RunConfig, None, ["data.source=hf", "data.kind=bundled"])
    assert configlib.load(RunConfig, None, ["data.source=array_record"]).data.source == "array_record"
    with pytest.raises(SourceError, match="no manifest"):
        open_source(roots["files"], "hf")
    with pytest.raises(SourceError, match="written as 'array_record'"):
        open_source(roots["array_record"], "hf")
    with pytest.raises(SourceError, match="no table 'query/train/x.jsonl'"):
        open_source(roots["hf"], "hf").queries("query/train/x.jsonl")


def test_progress_lines_give_rate_and_eta():
    t = [0.0]
    lines = []
    p = Progress("embed pool", total=100, every_s=10, log=lines.append, clock=lambda: t[0])
    for _ in range(4):
        t[0] += 5.0
        p.update(10)  # 10 items per 5 s = 2 items/s
    p.close()
    assert lines[0] == "[elva_jax] embed pool: 20/100 (20.0%), 2.0 items/s, ETA 40 s"
    assert lines[1] == "[elva_jax] embed pool: 40/100 (40.0%), 2.0 items/s, ETA 30 s"
    assert len(lines) == 3 and lines[2].endswith("ETA 30 s")
