"""The RL stage's instances from every data source: built from prepared ArrayRecord shards or an HF
datasets directory they equal, in order and content, the instances the files-only builder made from the
original M-BEIR files (query, positive, hard and random negatives, mined negatives); the images' bytes
ride in the sides and decode to the same pixels with the original image files gone; the skip policy
drops the same queries; and the RL loop's step -> instance-index order is the same (resume included)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from elva_jax import configlib
from elva_jax.data.benchmarks import mbeir
from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.media.image_processing import load_image, preprocess_image
from elva_jax.data.prepare import prepare
from elva_jax.data.records import contrastive_records, corpus_records
from elva_jax.rl.instances import add_random_negatives, build_rl_instances, select_instances
from elva_jax.rl.loop import step_batches
from elva_jax.rl.trainer import side_image
from elva_jax.runtime.run_data import BUNDLED_POOL, BUNDLED_TRAIN
from elva_jax.schema import RunConfig
from elva_jax.train.stages import mining_embed

KINDS = ("files", "array_record", "hf")
INS = "instructions/query_instructions.tsv"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A small M-BEIR-format set (one query's positive broken: not in the pool), prepared both ways."""
    base = tmp_path_factory.mktemp("rlsrc")
    mg = base / "mg"
    generate(mg, seed=0, n_train=4, n_test=1)
    path = mg / BUNDLED_TRAIN
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["pos_cand_list"] = ["10:999999"]
    lines[0] = json.dumps(first)
    path.write_text("\n".join(lines) + "\n")
    prepare(str(mg), str(base / "ar"), fmt="array_record", rows_per_shard=7, log=lambda _: None)
    prepare(str(mg), str(base / "hf"), fmt="hf", log=lambda _: None)
    return {"files": str(mg), "array_record": str(base / "ar"), "hf": str(base / "hf"), "base": base}


def _cfg(roots, kind, *over):
    return configlib.load(
        RunConfig,
        None,
        [
            "data.kind=mbeir",
            f"data.source={kind}",
            f"data.root={roots[kind]}",
            f"data.train_files=[{BUNDLED_TRAIN}]",
            f"data.pool_file={BUNDLED_POOL}",
            "data.image_policy=skip",
            "data.max_skip_fraction=0.2",
            "train.stages=[contrastive,rl]",
            f"run.dir={roots['base'] / ('run_' + kind)}",
            *over,
        ],
    )


def _oracle(root, *, n_hard, n_random, fraction, seed):
    """The files-only builder as it was: list records over the parsed files, then selection and random
    negatives on the lists."""
    qs, pool = mbeir.read_queries(f"{root}/{BUNDLED_TRAIN}"), mbeir.read_pool(f"{root}/{BUNDLED_POOL}")
    ins = mbeir.read_instructions(f"{root}/{INS}")
    dropped: list[str] = []
    recs = contrastive_records(qs, pool, root, instructions=ins, num_negatives=n_hard, dropped=dropped)
    recs = select_instances(recs, fraction, seed)
    sides = [corpus_records([c], root)[0]["item"] for c in pool.values()]
    return add_random_negatives(recs, sides, n_random, seed), dropped


def _strip(rec):
    keep = ("text", "image", "instruction")
    return {
        "id": rec["id"],
        "query": {k: rec["query"][k] for k in keep},
        "cands": [{k: c[k] for k in keep} for c in rec["cands"]],
    }


def _sides(inst):
    return [s for r in inst for s in (r["query"], *r["cands"])]


def test_dataset_negatives_are_the_same_from_every_source(roots, tmp_path):
    over = ("rl.negatives=dataset", "rl.num_hard_negatives=2", "rl.num_random_negatives=3", "rl.query_fraction=0.6")
    ref, ref_dropped = _oracle(roots["files"], n_hard=2, n_random=3, fraction=0.6, seed=0)
    assert len(ref_dropped) == 1 and len(ref) >= 8 and all(len(r["cands"]) == 6 for r in ref)
    built = {}
    for kind in KINDS:
        dropped: list[str] = []
        inst = build_rl_instances(_cfg(roots, kind, *over), roots[kind], dropped=dropped)
        assert dropped == ref_dropped, kind  # the skip policy leaves out the same query, same reason
        assert [_strip(inst[i]) for i in range(len(inst))] == ref, kind
        built[kind] = [inst[i] for i in range(len(inst))]
    assert built["files"] == ref  # the files source: exactly the old records (no bytes)
    sides = {k: _sides(v) for k, v in built.items()}
    with_img = [i for i, s in enumerate(sides["files"]) if s["image"] is not None]
    assert len(with_img) > 10
    for kind in ("array_record", "hf"):
        for i in with_img:  # the stored bytes are the image file's bytes
            assert sides[kind][i]["image_bytes"] == open(sides["files"][i]["image"], "rb").read(), kind
    pix = {i: preprocess_image(load_image(sides["files"][i]["image"])) for i in with_img}
    gone = roots["base"] / "images_moved"
    shutil.move(f"{roots['files']}/images", gone)  # prepared sources need no image file
    try:
        for kind in ("array_record", "hf"):
            for i in with_img:
                pv, grid = preprocess_image(side_image(sides[kind][i]))
                assert np.array_equal(pv, pix[i][0]) and np.array_equal(grid, pix[i][1]), kind
    finally:
        shutil.move(gone, f"{roots['files']}/images")


def test_rl_step_order_is_the_same_on_every_source_and_on_resume(roots):
    over = ("rl.negatives=dataset", "rl.num_hard_negatives=1", "rl.num_random_negatives=1", "rl.query_fraction=1.0")
    ids = {}
    for kind in KINDS:
        inst = build_rl_instances(_cfg(roots, kind, *over), roots[kind], dropped=[])
        order = step_batches(len(inst), 4, seed=0)
        ids[kind] = [[inst[int(i)]["id"] for i in order[s]] for s in range(12)]  # 12 steps: past an epoch
        resumed = step_batches(len(inst), 4, seed=0)  # a fresh run reading steps 7.. directly
        assert [[inst[int(i)]["id"] for i in resumed[s]] for s in range(7, 12)] == ids[kind][7:]
    assert ids["files"] == ids["array_record"] == ids["hf"]
    assert len({i for step in ids["files"] for i in step}) > 4


def test_the_fail_policy_names_the_query_on_every_source(roots):
    from elva_jax.data.errors import RecordError

    for kind in KINDS:
        cfg = _cfg(roots, kind, "data.image_policy=fail", "rl.negatives=dataset")
        with pytest.raises(RecordError, match="not in the pool"):
            build_rl_instances(cfg, roots[kind])


def test_missing_image_at_preparation_raises_naming_the_shard():
    from elva_jax.data.errors import ImageError

    with pytest.raises(ImageError, match="was missing when x.array_record, record 3 was prepared"):
        side_image({"image": "/nowhere.png", "image_bytes": None, "where": "x.array_record, record 3"})


def test_mined_negatives_are_the_same_from_prepared_shards(roots):
    """Mining embeds queries and pool with the model: from ArrayRecord shards (image bytes) it picks
    the same negatives as from the files."""
    import jax

    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config

    mcfg = preset_config("tiny")
    params = init_params(mcfg, jax.random.key(0))
    tok = Tokenizer.from_dir(geometry=mcfg.vision.geometry)
    over = (
        "data.seq_buckets=[128]",
        "data.patch_row_len=64",
        "rl.query_fraction=0.3",
        "rl.num_hard_negatives=2",
        "rl.num_random_negatives=1",
    )
    got = {}
    for kind in ("files", "array_record"):
        cfg = _cfg(roots, kind, *over)
        inst = build_rl_instances(cfg, roots[kind], embed=mining_embed(cfg, params, mcfg, tok))
        got[kind] = [_strip(inst[i]) for i in range(len(inst))]
    assert got["files"] == got["array_record"]
    assert got["files"] and all(len(r["cands"]) == 4 for r in got["files"])
