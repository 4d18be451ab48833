"""Grain pipeline: determinism, resume (incl. Orbax), host partition, static shapes, padding
invariance on the tiny model, image-failure policies."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from elva_jax.data.benchmarks import mbeir
from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.errors import ImageError, SkippedFractionError
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline, restore_checkpoint, save_checkpoint
from elva_jax.data.records import _side, contrastive_records
from elva_jax.model.config import ModelOptions
from elva_jax.model.tiny import preset_config

BUCKETS = (64, 128, 256)
BASE = PipelineConfig(
    batch_size=4,
    micro_batches=2,
    seq_buckets=BUCKETS,
    patch_budget=(4, 256),
    cand_patch_budget=(8, 256),
    num_negatives=1,
    seed=0,
    process_index=0,
    process_count=1,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mg")
    generate(root, seed=0)
    qs = mbeir.read_queries(root / "query/train/mbeir_multigrain_union_train.jsonl")
    pool = mbeir.read_pool(root / "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl")
    ins = mbeir.read_instructions(root / "instructions/query_instructions.tsv")
    return root, qs, pool, ins


@pytest.fixture(scope="module")
def records(data):
    root, qs, pool, ins = data
    return contrastive_records(qs, pool, root, instructions=ins, num_negatives=1)


@pytest.fixture(scope="module")
def encoder():
    from elva_jax.data.encoding import PromptEncoder
    from elva_jax.data.tokenize import Tokenizer

    return PromptEncoder(Tokenizer.from_dir(), "eol")


@pytest.fixture(scope="module")
def model_cfg():
    return preset_config("tiny")


def _ids(records, encoder, model_cfg, n, **kw):
    it = make_pipeline(records, encoder, model_cfg, dataclasses.replace(BASE, **kw))
    out = []
    for _ in range(n):
        next(it)
        out.append(list(it.last_ids))
    return out


def _same(a, b):
    return jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_records_are_deterministic(data, records):
    root, qs, pool, ins = data
    again = contrastive_records(qs, pool, root, instructions=ins, num_negatives=1)
    assert again == records
    assert all(len(r["cands"]) == 2 for r in records)
    assert records[0]["query"]["instruction"] in ins[mbeir.instruction_key(10, qs[0].query_modality, "image")]


def test_shuffle_deterministic(records, encoder, model_cfg):
    a = _ids(records, encoder, model_cfg, 3, seed=1)
    b = _ids(records, encoder, model_cfg, 3, seed=1)
    c = _ids(records, encoder, model_cfg, 3, seed=2)
    assert a == b
    assert a != c


def test_resume_from_state_and_orbax(records, encoder, model_cfg, tmp_path):
    import orbax.checkpoint as ocp

    it = make_pipeline(records, encoder, model_cfg, BASE)
    next(it), next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(2)]
    expect_ids = it.last_ids

    fresh = make_pipeline(records, encoder, model_cfg, BASE)
    fresh.set_state(state)
    assert all(_same(e, next(fresh)) for e in expect)

    # Orbax round trip, saved together with another item
    it2 = make_pipeline(records, encoder, model_cfg, BASE)
    next(it2), next(it2)
    tree = {"w": np.arange(3.0)}
    save_checkpoint(tmp_path / "ckpt", 2, it2, state=ocp.args.StandardSave(tree))
    restored_it = make_pipeline(records, encoder, model_cfg, BASE)
    out = restore_checkpoint(tmp_path / "ckpt", restored_it, state=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(out["state"]["w"], tree["w"])
    assert all(_same(e, next(restored_it)) for e in expect)
    assert restored_it.last_ids == expect_ids


def _steps(records, encoder, model_cfg, cfg, n_hosts, n_steps=None, state=None):
    """Per global step: the record ids of every host's batch (hosts run in turn, as separate processes
    would); also returns each host's final state."""
    its = [
        make_pipeline(records, encoder, model_cfg, dataclasses.replace(cfg, process_index=h, process_count=n_hosts))
        for h in range(n_hosts)
    ]
    if state is not None:
        for it in its:
            it.set_state(state)
    steps = []
    while n_steps is None or len(steps) < n_steps:
        try:
            hosts = []
            for it in its:
                next(it)
                hosts.append(list(it.last_ids))
        except StopIteration:
            assert not hosts, "hosts ran out of batches at different steps"
            break
        steps.append(hosts)
    return steps, [it.get_state() for it in its]


def test_host_slices_partition(records, encoder, model_cfg):
    """Hosts read disjoint slices; every step's union is the one-host global batch; all hosts end together."""
    G = 6
    cfg = dataclasses.replace(BASE, micro_batches=1, batch_size=G)
    one, _ = _steps(records, encoder, model_cfg, cfg, 1)
    assert len(one) == len(records) // G
    for n_hosts in (2, 3):
        many, states = _steps(records, encoder, model_cfg, dataclasses.replace(cfg, batch_size=G // n_hosts), n_hosts)
        assert len(many) == len(one)
        for ref, hosts in zip(one, many, strict=True):
            assert all(len(h) == G // n_hosts for h in hosts)
            assert sorted(i for h in hosts for i in h) == sorted(ref[0])
        assert all(s == states[0] for s in states)  # the position does not depend on the host
    seen = [i for step in one for i in step[0]]
    assert len(set(seen)) == len(seen) == len(records) // G * G


def test_resume_with_a_different_host_count(records, encoder, model_cfg):
    """Saved on 2 hosts after 3 steps, resumed on 3 hosts (and on 1): the steps continue exactly where
    the uninterrupted one-host run goes, with the same records per global step."""
    G = 6
    cfg = dataclasses.replace(BASE, micro_batches=1, batch_size=G, num_epochs=2)
    ref, _ = _steps(records, encoder, model_cfg, cfg, 1, n_steps=8)
    first, states = _steps(records, encoder, model_cfg, dataclasses.replace(cfg, batch_size=3), 2, n_steps=3)
    assert states[0] == states[1] and states[0]["global_next_index"] == 3 * G
    for n_hosts in (3, 1):
        rest, _ = _steps(
            records, encoder, model_cfg, dataclasses.replace(cfg, batch_size=G // n_hosts), n_hosts, 5, states[0]
        )
        got = [sorted(i for h in step for i in h) for step in first + rest]
        assert got == [sorted(step[0]) for step in ref]
    other = dataclasses.replace(cfg, seed=5, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="shuffle seed"):
        make_pipeline(records, encoder, model_cfg, other).set_state(states[0])


def test_static_shapes(records, encoder, model_cfg):
    it = make_pipeline(records, encoder, model_cfg, dataclasses.replace(BASE, num_epochs=None))
    lengths = set()
    for _ in range(12):
        b = next(it)
        for g, (R, Lv), rows in (("query", (4, 256), 4), ("cand", (8, 256), 8)):
            x = b[g]
            A, B, L = x["input_ids"].shape
            assert (A, B) == (2, rows)
            assert L in BUCKETS
            lengths.add(L)
            assert x["attention_mask"].shape == (A, B, L)
            assert x["positions"].shape == (A, 3, B, L)
            assert x["patches"].shape == (A, R, Lv, 1176)
            assert x["vision_segment_ids"].shape == (A, R, Lv)
            assert x["vision_pos"].shape == (A, R, Lv, 2)
    assert lengths <= set(BUCKETS)
    assert it.stats.batches == 12 and it.stats.examples == 96 and it.stats.images > 0


def test_truncation_is_counted(data, encoder, model_cfg):
    long = [{"id": "nli:0", "query": _side("word " * 400, None), "cands": [_side("short", None)]}] * 2
    cfg = dataclasses.replace(BASE, batch_size=2, micro_batches=1, num_negatives=0, patch_budget=None, shuffle=False)
    it = make_pipeline(long, encoder, model_cfg, cfg)
    b = next(it)
    assert b["query"]["input_ids"].shape[-1] == max(BUCKETS)
    assert it.stats.truncated == 2


def test_padding_does_not_change_embeddings(records, encoder, model_cfg):
    from elva_jax.model.backbone import forward
    from elva_jax.model.embedding import eol_embedding
    from elva_jax.model.params import init_params

    opts = ModelOptions()
    params = init_params(model_cfg, jax.random.key(0))

    def embed(inputs):
        h = forward(params, inputs, model_cfg, opts).hidden
        return np.asarray(
            eol_embedding(h, inputs["input_ids"], encoder.tokenizer.emb_token_id, inputs["attention_mask"])
        )

    rec = next(r for r in records if r["query"]["image"] is None)  # text query, image candidates
    cfg1 = dataclasses.replace(
        BASE, batch_size=1, micro_batches=1, num_negatives=0, shuffle=False, seq_buckets=(48, 64, 256)
    )
    one = [{**rec, "cands": rec["cands"][:1]}]
    b1 = next(make_pipeline(one, encoder, model_cfg, cfg1))
    others = [{**r, "cands": r["cands"][:1]} for r in records[:7] if r["id"] != rec["id"]][:3]
    cfg4 = dataclasses.replace(cfg1, batch_size=4)
    b4 = next(make_pipeline(others[:2] + one + others[2:], encoder, model_cfg, cfg4))
    for g in ("query", "cand"):
        x1 = {k: v[0] for k, v in b1[g].items()}
        x4 = {k: v[0] for k, v in b4[g].items()}
        assert x4["input_ids"].shape[1] >= x1["input_ids"].shape[1]
        e1, e4 = embed(x1)[0], embed(x4)[2]
        np.testing.assert_allclose(e1, e4, atol=1e-5)


def _with_missing(records, data, tmp_path, n_missing):
    """Copy the image tree and delete the positive image of the first n_missing records."""
    root = data[0]
    dst = tmp_path / "root"
    shutil.copytree(root / "images", dst / "images")
    recs = []
    missing = []
    for r in records:
        cands = [{**c, "image": c["image"].replace(str(root), str(dst)) if c["image"] else None} for c in r["cands"]]
        q = {**r["query"], "image": r["query"]["image"].replace(str(root), str(dst)) if r["query"]["image"] else None}
        recs.append({**r, "query": q, "cands": cands})
    for r in recs:
        if len(missing) == n_missing:
            break
        img = r["cands"][0]["image"]
        if img and img not in missing:
            missing.append(img)
    for m in missing:
        (dst / m[len(str(dst)) + 1 :]).unlink()
    return recs, missing


def test_missing_image_fail_names_path(records, data, encoder, model_cfg, tmp_path):
    recs, missing = _with_missing(records, data, tmp_path, 1)
    cfg = dataclasses.replace(BASE, shuffle=False, batch_size=len(recs), micro_batches=1, cand_patch_budget=(400, 256))
    cfg = dataclasses.replace(cfg, patch_budget=(200, 256))
    with pytest.raises(ImageError, match=missing[0]):
        next(make_pipeline(recs, encoder, model_cfg, cfg))


def test_missing_image_skip_counts_then_fails(records, data, encoder, model_cfg, tmp_path):
    recs, missing = _with_missing(records, data, tmp_path, 2)
    skip = ImagePolicy(mode="skip", max_skip_fraction=0.25, min_seen=40)
    cfg = dataclasses.replace(BASE, shuffle=False, batch_size=1, micro_batches=1, image_policy=skip)
    it = make_pipeline(recs, encoder, model_cfg, cfg)
    ids = [i for _ in it for i in it.last_ids]
    bad = {r["id"] for r in recs if {r["query"]["image"], *(c["image"] for c in r["cands"])} & set(missing)}
    assert len(bad) >= 2
    # every slot is filled: each bad record's slot holds a substitute, seen once more than usual
    assert len(ids) == len(recs) and set(ids) == {r["id"] for r in recs} - bad
    assert len(ids) - len(set(ids)) == len(bad)
    assert it.stats.skipped >= len(bad) and set(it.stats.skipped_paths) == set(missing)
    assert it.stats.seen == len(recs) + it.stats.skipped

    # substitutes come from later global batches, so a step's records do not depend on the host count
    cfg6 = dataclasses.replace(cfg, batch_size=6, num_epochs=1)
    one, _ = _steps(recs, encoder, model_cfg, cfg6, 1)
    two, _ = _steps(recs, encoder, model_cfg, dataclasses.replace(cfg6, batch_size=3), 2)
    assert [sorted(s[0]) for s in one] == [sorted(s[0] + s[1]) for s in two]
    assert all(len(set(s[0])) == 6 for s in one)

    strict = dataclasses.replace(cfg, image_policy=dataclasses.replace(skip, max_skip_fraction=0.001, min_seen=1))
    with pytest.raises(SkippedFractionError):
        list(make_pipeline(recs, encoder, model_cfg, strict))


def test_records_that_cannot_be_used_name_their_query(tmp_path):
    from elva_jax.data.benchmarks.mbeir import Candidate, Query
    from elva_jax.data.errors import RecordError
    from elva_jax.data.records import contrastive_records

    q = Query("9:1", "a dog", None, "text", ("9:7",), (), 0)
    pool = {"9:2": Candidate("9:2", "a cat", None, "text")}
    with pytest.raises(RecordError, match=r"query '9:1': candidates \['9:7'\] are not in the pool"):
        contrastive_records([q], pool, tmp_path)


def test_the_skip_policy_leaves_out_records_that_cannot_be_built_and_names_them(tmp_path):
    """With a ``dropped`` list (the skip policy) a query without a positive or with a candidate missing
    from the pool is left out and named there; the good queries keep their order."""
    from elva_jax.data.benchmarks.mbeir import Candidate, Query
    from elva_jax.data.records import contrastive_records

    pool = {f"9:{i}": Candidate(f"9:{i}", f"cand {i}", None, "text") for i in range(3)}
    qs = [
        Query("9:a", "first", None, "text", ("9:0",), (), 0),
        Query("9:b", "no positive", None, "text", (), (), 0),
        Query("9:c", "missing", None, "text", ("9:7",), (), 0),
        Query("9:d", "last", None, "text", ("9:2",), (), 0),
    ]
    dropped: list[str] = []
    recs = contrastive_records(qs, pool, tmp_path, dropped=dropped)
    assert [r["id"] for r in recs] == ["9:a", "9:d"]
    assert [r["cands"][0]["text"] for r in recs] == ["cand 0", "cand 2"]
    assert len(dropped) == 2 and "'9:b' has no positive" in dropped[0] and "'9:c'" in dropped[1]


def test_an_image_larger_than_a_patch_row_is_a_named_bad_image(tmp_path):
    """With the skip policy it is skipped and counted like any bad image; with fail it names the file."""
    from PIL import Image

    from elva_jax.data.errors import ImageError
    from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig
    from elva_jax.data.pipeline.encode import EncodeRecord

    big = tmp_path / "big.png"
    Image.new("RGB", (560, 560), "red").save(big)
    cfg = PipelineConfig(
        patch_budget=(1, 64), image_policy=ImagePolicy("fail"), media=MediaSettings(max_pixels=560 * 560)
    )
    enc = EncodeRecord(None, cfg, ("query",))
    with pytest.raises(ImageError, match=r"big\.png needs 1600 patches, more than a row of 64"):
        enc._load(str(big))
