"""M-BEIR / MRBench / NLI readers: they load the bundled generator's output and reject bad input with
DataFormatError naming the file and the 1-based line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from elva_jax.data.benchmarks.mbeir import (
    Candidate,
    Query,
    check_qrels_against_pool,
    dataset_id_of,
    instruction_key,
    read_instructions,
    read_mbeir_task,
    read_mrbench,
    read_pool,
    read_qrels,
    read_queries,
    resolve_image_path,
)
from elva_jax.data.benchmarks.multigrain.build import N_HARD_NEGATIVES, TASKS
from elva_jax.data.benchmarks.multigrain.generator import MRBENCH_TASKS, generate
from elva_jax.data.benchmarks.nli import read_nli_csv
from elva_jax.data.errors import DataFormatError

NAME = "mbeir_multigrain"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multigrain")
    generate(out, seed=0, n_train=12, n_test=8)
    return out


# ----------------------------------------------------------------------------------------------------
# good input


def test_readers_load_generated_data(root):
    for split, n in (("train", 12), ("test", 8)):
        for task in TASKS:
            queries = read_queries(root / "query" / split / f"{NAME}_task{task}_{split}.jsonl")
            assert len(queries) == n
            assert all(isinstance(q, Query) and q.task_id == task for q in queries)
            assert all(q.query_modality == TASKS[task][0] for q in queries)
            assert all(q.dataset_id == 10 and isinstance(q.qid, str) for q in queries)
    union = read_queries(root / "query" / "train" / f"{NAME}_union_train.jsonl")
    assert len(union) == 12 * len(TASKS)
    train_pool = read_pool(root / "cand_pool" / "global" / f"{NAME}_union_train_cand_pool.jsonl")
    assert all(d in train_pool for q in union for d in q.pos_cand_list + q.neg_cand_list)
    for task in TASKS:
        t = read_mbeir_task(root, f"{NAME}_task{task}")
        assert len(t.queries) == 8 and len(t.qrels) == 8
        assert {c.modality for c in t.pool.values()} == {TASKS[task][1]}
        for q in t.queries:
            assert t.qrels.positives[q.qid] == q.pos_cand_list and t.qrels.task_ids[q.qid] == task
            if q.query_img_path is not None:
                assert resolve_image_path(root, q.query_img_path, must_exist=True).is_file()
        for c in t.pool.values():
            if c.img_path is not None:
                assert resolve_image_path(root, c.img_path, must_exist=True).is_file()


def test_instructions_mrbench_nli(root):
    table = read_instructions(root / "instructions" / "query_instructions.tsv")
    for qmod, cmod in TASKS.values():
        assert len(table[instruction_key(10, qmod, cmod)]) == 3
    assert "10, image,text, image" in table
    bench = read_mrbench(root / "mrbench")
    assert sorted(bench) == [f"{NAME}_task{t}" for t in MRBENCH_TASKS]
    assert all(0 < len(t.queries) <= 8 for t in bench.values())
    rows = read_nli_csv(root / "nli" / "multigrain_nli_train.csv")
    assert len(rows) == 12 * N_HARD_NEGATIVES
    assert all(a and b and c and a != c for a, b, c in rows)


def test_id_helpers_and_frozen(root):
    assert dataset_id_of("9:123") == 9 and dataset_id_of("10:1") == 10
    for bad in ("9", "x:1", ":3", "9:", ""):
        with pytest.raises(ValueError):
            dataset_id_of(bad)
    q = read_queries(root / "query" / "test" / f"{NAME}_task0_test.jsonl")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.qid = "1:1"  # type: ignore[misc]
    assert hash(q) == hash(dataclasses.replace(q))
    assert resolve_image_path("/m", "a/b.png") == Path("/m/a/b.png")
    with pytest.raises(FileNotFoundError):
        resolve_image_path(root, "images/none.png", must_exist=True)


# ----------------------------------------------------------------------------------------------------
# bad input: every case names the file and the 1-based line

GOOD_QUERY = {
    "qid": "9:1",
    "query_txt": "a dog",
    "query_img_path": None,
    "query_modality": "text",
    "query_src_content": None,
    "pos_cand_list": ["9:5"],
    "neg_cand_list": [],
    "task_id": 0,
}
GOOD_CAND = {"did": "9:5", "txt": None, "img_path": "images/a.png", "modality": "image"}


def _lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def _bad_line(path: Path, line: int, fn, match: str = "") -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(path)
    err = info.value
    assert str(path) in str(err) and f"line {line}" in str(err), str(err)
    assert err.line == line and err.path == str(path)
    assert re.search(match, str(err)), str(err)
    return err


QUERY_CASES = {
    "malformed_json": ('{"qid": "9:3", ', "malformed JSON"),
    "not_an_object": ("[1, 2]", "JSON object"),
    "unknown_modality": ({**GOOD_QUERY, "qid": "9:3", "query_modality": "audio"}, "unknown query_modality"),
    "missing_field": ({k: v for k, v in GOOD_QUERY.items() if k != "task_id"} | {"qid": "9:3"}, "'task_id'"),
    "missing_src_content": (
        {k: v for k, v in GOOD_QUERY.items() if k != "query_src_content"} | {"qid": "9:3"},
        "'query_src_content'",
    ),
    "wrong_type_task": ({**GOOD_QUERY, "qid": "9:3", "task_id": "0"}, "integer"),
    "wrong_type_qid": ({**GOOD_QUERY, "qid": 3}, "'qid'"),
    "wrong_type_list": ({**GOOD_QUERY, "qid": "9:3", "neg_cand_list": "9:7"}, "neg_cand_list"),
    "empty_positives": ({**GOOD_QUERY, "qid": "9:3", "pos_cand_list": []}, "pos_cand_list"),
    "text_with_image": ({**GOOD_QUERY, "qid": "9:3", "query_img_path": "a.png"}, "inconsistent"),
    "image_without_path": ({**GOOD_QUERY, "qid": "9:3", "query_modality": "image"}, "inconsistent"),
    "text_with_video": ({**GOOD_QUERY, "qid": "9:3", "query_video_path": "v.mp4"}, r"query_video_path: present"),
    "video_without_path": ({**GOOD_QUERY, "qid": "9:3", "query_modality": "video,text"}, "inconsistent"),
    "video_path_not_a_string": (
        {**GOOD_QUERY, "qid": "9:3", "query_modality": "video,text", "query_video_path": 7},
        "'query_video_path' must be a string or null",
    ),
    "duplicate_qid": (GOOD_QUERY, "duplicate qid"),
}


def test_video_fields_are_optional_and_read(tmp_path):
    """This project's video extension: query_video_path / video_path with modality video or video,text;
    records without them read as before (None)."""
    q = tmp_path / "q.jsonl"
    vq = {**GOOD_QUERY, "qid": "9:2", "query_modality": "video,text", "query_video_path": "clips/a.mp4"}
    q.write_text(_lines(GOOD_QUERY, vq, {**vq, "qid": "9:3", "query_txt": None, "query_modality": "video"}))
    got = read_queries(q)
    assert [x.query_video_path for x in got] == [None, "clips/a.mp4", "clips/a.mp4"]
    assert [x.query_modality for x in got] == ["text", "video,text", "video"]
    p = tmp_path / "p.jsonl"
    p.write_text(
        _lines(GOOD_CAND, {"did": "9:6", "txt": "t", "img_path": None, "video_path": "f/", "modality": "video,text"})
    )
    pool = read_pool(p)
    assert pool["9:5"].video_path is None and pool["9:6"] == Candidate("9:6", "t", None, "video,text", video_path="f/")


@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_bad_query_file(tmp_path, case):
    bad, match = QUERY_CASES[case]
    path = tmp_path / "queries.jsonl"
    second = {**GOOD_QUERY, "qid": "9:2", "query_modality": "image,text", "query_img_path": "x.png"}
    path.write_text(_lines(GOOD_QUERY, second, bad))
    _bad_line(path, 3, read_queries, match)


POOL_CASES = {
    "malformed_json": ("{did: 1}", "malformed JSON"),
    "unknown_modality": ({**GOOD_CAND, "did": "9:7", "modality": "audio"}, "unknown modality"),
    "video_without_path": ({**GOOD_CAND, "did": "9:7", "img_path": None, "modality": "video"}, "video_path: absent"),
    "image_and_video": ({**GOOD_CAND, "did": "9:7", "video_path": "v.mp4", "modality": "video"}, "inconsistent"),
    "missing_did": ({k: v for k, v in GOOD_CAND.items() if k != "did"}, "'did'"),
    "missing_txt": ({k: v for k, v in GOOD_CAND.items() if k != "txt"} | {"did": "9:7"}, "'txt'"),
    "inconsistent": ({**GOOD_CAND, "did": "9:7", "modality": "image,text"}, "inconsistent"),
    "duplicate_did": (GOOD_CAND, "duplicate did"),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_bad_pool_file(tmp_path, case):
    bad, match = POOL_CASES[case]
    path = tmp_path / "pool.jsonl"
    path.write_text(_lines(GOOD_CAND, {"did": "9:6", "txt": "a cat", "img_path": None, "modality": "text"}, bad))
    _bad_line(path, 3, read_pool, match)


@pytest.mark.parametrize("content,line", [("", 1), ("\n\n", 3)])
def test_empty_pool(tmp_path, content, line):
    path = tmp_path / "pool.jsonl"
    path.write_text(content)
    _bad_line(path, line, read_pool, "empty")


@pytest.mark.parametrize(
    "bad,match",
    [("9:3 0 9:5 1", "5 fields"), ("9:3 0 9:5 one 0", "non-integer"), ("9:1 0 9:6 1 3", "task ids")],
)
def test_bad_qrels_file(tmp_path, bad, match):
    path = tmp_path / "qrels.txt"
    path.write_text(f"9:1 0 9:5 1 0\n9:2 0 9:5 1 0\n{bad}\n")
    _bad_line(path, 3, read_qrels, match)


def test_qrels_id_not_in_pool(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("9:1 0 9:5 1 0\n9:2 0 9:5 1 0\n\n9:3 0 9:404 1 0\n")
    pool = {"9:5": Candidate("9:5", None, "images/a.png", "image")}
    qrels = read_qrels(path)
    _bad_line(path, 4, lambda p: check_qrels_against_pool(qrels, pool, p), "9:404")
    _bad_line(path, 4, lambda p: check_qrels_against_pool(qrels, pool), "not in the candidate pool")


def test_mbeir_task_checks_qrels(tmp_path, root):
    """A doctored copy of a generated task whose qrels names a did absent from the local pool."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "mrbench", copy)
    qrels = copy / "qrels" / "test" / f"{NAME}_task0_test_qrels.txt"
    lines = qrels.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " 0 10:999999 1 0"
    qrels.write_text("\n".join(lines) + "\n")
    _bad_line(qrels, 2, lambda p: read_mrbench(copy), "10:999999")


@pytest.mark.parametrize(
    "row,match",
    [
        ("text\taudio\tx\t9\tFind it.", "unknown candidate modality"),
        ("text\timage\tx\t9", ">= 5"),
        ("text\timage\tx\tnine\tFind it.", "dataset_id"),
        ("text\timage\tx\t9\t\t", "no prompt"),
        ("image\ttext\tx\t9\tAgain.", "duplicate"),
    ],
)
def test_bad_instructions(tmp_path, row, match):
    path = tmp_path / "instructions.tsv"
    path.write_text(f"header\nimage\ttext\tcoco\t9\tFind a caption.\t\n\n{row}\n")
    _bad_line(path, 4, read_instructions, match)


@pytest.mark.parametrize(
    "content,line,match",
    [
        ("sent0,sent1,hard_neg\na,b,c\nd,e\n", 3, "expected 3 cells"),
        ("sent0,sent1,hard_neg\na,b,c\n,e,f\n", 3, "empty sent0"),
        ('sent0,sent1,hard_neg\na,b,c\n"multi\nline",e,f,g\n', 4, "expected 3 cells"),
        ("sent0,other\na,b\n", 1, "sent1"),
        ("", 1, "empty file"),
    ],
)
def test_bad_nli_rows(tmp_path, content, line, match):
    path = tmp_path / "nli.csv"
    path.write_text(content)
    _bad_line(path, line, read_nli_csv, match)


def test_nli_optional_hard_neg(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1\n"a, quoted",b\n')
    assert read_nli_csv(path) == [("a, quoted", "b", None)]
    path.write_text("sent1,hard_neg,sent0\nb,,a\n")
    assert read_nli_csv(path) == [("a", "b", None)]


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    from elva_jax.data.errors import DataFormatError

    good = '{"qid": "9:1", "query_txt": "a", "query_img_path": null, "query_modality": "text", "query_src_content": null, "pos_cand_list": ["9:2"], "neg_cand_list": [], "task_id": 0}\n'  # noqa: E501
    f = tmp_path / "q.jsonl"
    f.write_bytes(good.encode() + b'{"qid": "9:\xff"}\n')
    with pytest.raises(DataFormatError, match=r"q\.jsonl, line 2: not valid UTF-8 \(byte 0xff"):
        read_queries(f)
