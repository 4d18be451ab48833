"""The bundled multi-grain generator: determinism, one-grain hard negatives, disjoint splits, closed
references (qrels / pools / images). Grain checks use the structured scene records, not the captions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from elva_jax.data.benchmarks.mbeir import read_pool, read_qrels, read_queries
from elva_jax.data.benchmarks.multigrain.build import N_HARD_NEGATIVES, TASKS
from elva_jax.data.benchmarks.multigrain.generator import MRBENCH_TASKS, GeneratorTargetError, generate, main
from elva_jax.data.benchmarks.multigrain.scenes import GRAIN_KINDS, IMAGE_SIDES, SHAPES
from elva_jax.data.benchmarks.multigrain.texts import N_SUMMARIES
from elva_jax.data.benchmarks.nli import read_nli_csv
from elva_jax.data.media.image_processing import num_image_tokens, preprocess_image

ATTRS = ("colour", "shape", "size", "position")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multigrain")
    summary = generate(root, seed=0)
    scenes = {s["scene_id"]: s for s in _jsonl(root / "meta" / "scenes.jsonl")}
    cand_scene = {c["did"]: c["scene_id"] for c in _jsonl(root / "meta" / "candidates.jsonl")}
    queries = {
        (split, task): read_queries(root / "query" / split / f"mbeir_multigrain_task{task}_{split}.jsonl")
        for split in ("train", "test")
        for task in TASKS
    }
    return root, summary, scenes, cand_scene, queries


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _objects(scene: dict) -> Counter:
    return Counter(tuple(o[a] for a in ATTRS) for o in scene["objects"])


def grain_diff(a: dict, b: dict) -> list[str]:
    """Grains in which scene b differs from scene a, from the object multisets (order-free): one object
    changed in one attribute -> [attr]; one object added/removed -> ["count"]; anything else -> more."""
    oa, ob = _objects(a), _objects(b)
    only_a, only_b = list((oa - ob).elements()), list((ob - oa).elements())
    if not only_a and not only_b:
        return []
    if len(only_a) == len(only_b) == 1:
        return [attr for attr, x, y in zip(ATTRS, only_a[0], only_b[0]) if x != y]
    if {len(only_a), len(only_b)} == {0, 1}:
        return ["count"]
    return ["many"] * (len(only_a) + len(only_b))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(data, tmp_path):
    root, summary, *_ = data
    again = generate(tmp_path / "again", seed=0)
    assert {k: v for k, v in again.items() if k != "root"} == {k: v for k, v in summary.items() if k != "root"}
    first, second = _all_files(root), _all_files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []
    other = _all_files(Path(generate(tmp_path / "other", seed=1)["root"]))
    assert other["meta/scenes.jsonl"] != first["meta/scenes.jsonl"]


def test_sizes(data):
    _, summary, scenes, _, queries = data
    assert summary["n_images"] <= 400
    assert summary["queries"]["train"] == {str(t): 32 for t in TASKS}
    assert summary["queries"]["test"] == {str(t): 16 for t in TASKS}
    assert {1, 2, 3} == {len(s["objects"]) for s in scenes.values()}


def test_all_scenes_distinct(data):
    _, _, scenes, _, _ = data
    keys = [tuple(sorted(_objects(s).elements())) for s in scenes.values()]
    assert len(set(keys)) == len(keys)
    assert len({s["caption"] for s in scenes.values()}) == len(scenes)


def test_hard_negatives_differ_in_exactly_one_grain(data):
    _, _, scenes, cand_scene, queries = data
    kinds = Counter()
    for (_split, task), qs in queries.items():
        for q in qs:
            src = json.loads(q.query_src_content)
            (pos,) = q.pos_cand_list
            pos_scene = scenes[cand_scene[pos]]
            assert pos_scene["scene_id"] == src["target_scene_id"]
            if task != 7:
                assert src["target_scene_id"] == src["scene_id"]
            else:  # the edit target is itself one grain away from the query scene
                assert len(grain_diff(scenes[src["scene_id"]], pos_scene)) == 1
            assert len(q.neg_cand_list) == N_HARD_NEGATIVES
            assert pos not in q.neg_cand_list and len(set(q.neg_cand_list)) == len(q.neg_cand_list)
            for neg in q.neg_cand_list:
                diff = grain_diff(pos_scene, scenes[cand_scene[neg]])
                assert len(diff) == 1, (q.qid, neg, diff)
                kinds[diff[0]] += 1
    assert set(kinds) == set(GRAIN_KINDS)  # every grain kind is exercised


def test_candidate_modalities_and_texts(data):
    root, _, scenes, cand_scene, _ = data
    pool = read_pool(root / "cand_pool" / "global" / "mbeir_multigrain_union_test_cand_pool.jsonl")
    pool |= read_pool(root / "cand_pool" / "global" / "mbeir_multigrain_union_train_cand_pool.jsonl")
    for did, c in pool.items():
        if c.modality == "text":
            assert c.txt == scenes[cand_scene[did]]["caption"]


def test_splits_disjoint(data):
    root, _, scenes, cand_scene, queries = data
    qids = {s: {q.qid for (split, _), qs in queries.items() if split == s for q in qs} for s in ("train", "test")}
    assert qids["train"] and qids["test"] and not qids["train"] & qids["test"]
    pools = {
        s: read_pool(root / "cand_pool" / "global" / f"mbeir_multigrain_union_{s}_cand_pool.jsonl")
        for s in ("train", "test")
    }
    assert not set(pools["train"]) & set(pools["test"])
    content = {
        s: {tuple(sorted(_objects(scenes[cand_scene[d]]).elements())) for d in pools[s]} for s in ("train", "test")
    }
    assert not content["train"] & content["test"]
    images = {s: {q.query_img_path for (sp, _), qs in queries.items() if sp == s for q in qs} for s in pools}
    for s in pools:
        images[s] |= {c.img_path for c in pools[s].values()}
        images[s].discard(None)
    assert not images["train"] & images["test"]
    for split, task in queries:  # every query's candidates are in its split's union pool
        assert all(d in pools[split] for q in queries[split, task] for d in q.pos_cand_list + q.neg_cand_list)


def test_qrels_closed_over_pools(data):
    root, _, _, _, queries = data
    for base in (root, root / "mrbench"):
        tasks = TASKS if base == root else MRBENCH_TASKS
        for task in tasks:
            qrels = read_qrels(base / "qrels" / "test" / f"mbeir_multigrain_task{task}_test_qrels.txt")
            pool = read_pool(base / "cand_pool" / "local" / f"mbeir_multigrain_task{task}_cand_pool.jsonl")
            qs = read_queries(base / "query" / "test" / f"mbeir_multigrain_task{task}_test.jsonl")
            assert set(qrels.positives) == {q.qid for q in qs}
            assert all(d in pool for dids in qrels.positives.values() for d in dids)
            assert all(d in pool for q in qs for d in q.neg_cand_list)
            if base != root:
                full = {q.qid: q for q in queries["test", task]}
                assert all(full[q.qid] == q for q in qs) and 0 < len(qs) <= len(full)


def test_mrbench_is_multigrain(data):
    root, _, scenes, _, _ = data
    for task in MRBENCH_TASKS:
        for q in read_queries(root / "mrbench" / "query" / "test" / f"mbeir_multigrain_task{task}_test.jsonl"):
            assert len(scenes[json.loads(q.query_src_content)["scene_id"]]["objects"]) >= 2


def test_every_image_exists_and_is_small(data):
    root, _, _, _, queries = data
    paths = {q.query_img_path for qs in queries.values() for q in qs} - {None}
    for pool_file in (root / "cand_pool").rglob("*.jsonl"):
        paths |= {c.img_path for c in read_pool(pool_file).values()} - {None}
    assert len(paths) == len(list((root / "images").rglob("*.png")))
    for i, rel in enumerate(sorted(paths)):
        with Image.open(root / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert set(im.size) <= set(IMAGE_SIDES)
            if i % 25 == 0:
                _, grid = preprocess_image(im)
                assert num_image_tokens(grid) <= 16


def test_grain_records(data):
    root, _, scenes, _, queries = data
    records = {g["qid"]: g for g in _jsonl(root / "meta" / "query_grains.jsonl")}
    by_qid = {q.qid: q for qs in queries.values() for q in qs}
    assert set(records) == set(by_qid)
    for qid, g in records.items():
        q = by_qid[qid]
        if g["text_field"] == "query_txt":
            assert g["text"] == q.query_txt
        else:
            assert q.query_txt is None and g["text"] == scenes[g["query_scene"]]["caption"]
        assert {x["kind"] for x in g["grains"]} <= set(GRAIN_KINDS)
        for x in g["grains"]:
            start, end = x["span"]
            assert g["text"][start:end] == x["phrase"]
        if q.task_id != 7:  # a description names every grain: count + 4 per object
            assert len(g["grains"]) == 1 + 4 * g["n_objects"]


def test_nli_hard_negatives(data):
    root, _, scenes, _, _ = data
    by_caption = {s["caption"]: s for s in scenes.values()}
    rows = read_nli_csv(root / "nli" / "multigrain_nli_train.csv")
    assert len(rows) == 32 * N_HARD_NEGATIVES
    for sent0, sent1, hard_neg in rows:
        assert by_caption[sent0]["split"] == "train" and sent1 not in by_caption
        assert len(grain_diff(by_caption[sent0], by_caption[hard_neg])) == 1


def test_cli_and_overwrite(tmp_path):
    out = tmp_path / "cli"
    summary = main(["--out", str(out), "--n-train", "2", "--n-test", "2", "--seed", "3"])
    assert summary["queries"]["test"]["0"] == 2 and (out / "meta" / "summary.json").is_file()
    with pytest.raises(FileExistsError):
        generate(out, n_train=2, n_test=2)
    generate(out, n_train=3, n_test=2, overwrite=True)
    assert len(read_queries(out / "query" / "train" / "mbeir_multigrain_task0_train.jsonl")) == 3


def test_overwrite_removes_only_what_the_generator_wrote(tmp_path):
    out = tmp_path / "d"
    generate(out, n_train=1, n_test=1)
    (out / "query" / "mine.jsonl").write_text("my own file\n")  # a user's file inside a generated folder
    generate(out, n_train=2, n_test=1, overwrite=True)
    assert (out / "query" / "mine.jsonl").read_text() == "my own file\n"
    assert len(read_queries(out / "query" / "train" / "mbeir_multigrain_task0_train.jsonl")) == 2
    foreign = tmp_path / "foreign"
    (foreign / "query").mkdir(parents=True)
    (foreign / "query" / "data.jsonl").write_text("{}\n")
    with pytest.raises(GeneratorTargetError, match="not an output of this generator"):
        generate(foreign, overwrite=True)
    assert (foreign / "query" / "data.jsonl").read_text() == "{}\n"


def test_target_summaries_name_every_grain_of_the_scene_asked_for(data):
    """Every query and candidate carries target summaries (`query_src_content` / `src_content`): the first
    names each object's size, colour, shape and position in reading order; the others are the same objects
    in some order, partial ones dropping grains but never a shape; a query's describes its target scene
    (task 7: the edited one), so it equals its positive's."""
    root, _, scenes, cand_scene, queries = data
    pool = read_pool(root / "cand_pool" / "global" / "mbeir_multigrain_union_train_cand_pool.jsonl")

    def objects_of(text: str) -> list[list[str]]:
        return [part.split() for part in text.split(", ")]

    def expected(sid: str) -> list[list[str]]:
        return [[o["size"], o["colour"], o["shape"], *o["position"].split()] for o in scenes[sid]["objects"]]

    def check(targets: list[str], sid: str) -> None:
        assert len(targets) == N_SUMMARIES
        assert objects_of(targets[0]) == expected(sid)
        assert sorted(map(tuple, objects_of(targets[1]))) == sorted(map(tuple, expected(sid)))
        for t in targets[2:]:
            got = objects_of(t)
            assert len(got) == len(expected(sid))
            shapes = sorted(w for o in got for w in o if w in SHAPES)
            assert shapes == sorted(o[2] for o in expected(sid))
            for o in got:  # each object's words are a subsequence of one true object's
                assert any(_is_subsequence(o, e) for e in expected(sid)), (o, expected(sid))

    for c in pool.values():
        check(json.loads(c.src_content)["summary"], cand_scene[c.did])
    for (split, task), qs in queries.items():
        for q in qs:
            src = json.loads(q.query_src_content)
            target = src["target_scene_id"]
            if task == 7:  # the edited scene: a one-grain variant of the query's
                assert scenes[target]["parent"] == src["scene_id"] and target != src["scene_id"]
            else:
                assert target == src["scene_id"]
            check(src["summary"], target)
            if split == "train":
                assert src["summary"] == json.loads(pool[q.pos_cand_list[0]].src_content)["summary"]


def _is_subsequence(a: list[str], b: list[str]) -> bool:
    it = iter(b)
    return all(w in it for w in a)
