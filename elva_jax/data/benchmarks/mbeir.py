"""Readers for M-BEIR (UniIR) files and for MRBench-style subsets in the same format.

File formats (one JSON object per line for the two jsonl kinds; ids stay strings, "dataset:index"):

- query jsonl: ``qid, query_txt, query_img_path, query_modality, query_src_content, pos_cand_list,
  neg_cand_list, task_id``.
- candidate pool jsonl: ``did, txt, img_path, modality`` (``src_content`` optional).
- qrels txt: ``qid 0 did 1 task_id`` per line (whitespace separated), one line per positive.
- instructions tsv: a header, then ``query_modality \\t cand_modality \\t (unused) \\t dataset_id \\t
  prompt_1 ... prompt_k``; key ``"{dataset_id}, {query_modality}, {cand_modality}"``.

Modality rules (a field is *present* when it is a non-blank string): ``"text"`` needs text and no image,
``"image"`` an image and no text, ``"image,text"`` both. Video (this project's extension, not M-BEIR's):
an optional ``query_video_path`` (queries) / ``video_path`` (pool), a video file or frame folder relative
to the root like an image path, with modality ``"video"`` (video only) or ``"video,text"``, and an
optional ``query_video_fps`` / ``video_fps`` (a positive number: a frame folder's frame rate, passed as
the side's ``"video_fps"``; only beside a video); a record without the fields reads as before. Every violation raises
:class:`~elva_jax.data.errors.DataFormatError` naming the file and the 1-based line.

Directory layout (M-BEIR's, also used by MRBench and the bundled multi-grain set)::

    <root>/query/{train,test}/{name}_{split}.jsonl     name e.g. "mbeir_mscoco_task0"
    <root>/cand_pool/local/{name}_cand_pool.jsonl
    <root>/qrels/test/{name}_test_qrels.txt
    <root>/instructions/query_instructions.tsv
    image paths inside records are relative to the M-BEIR root (see resolve_image_path).

An MRBench directory has the same layout with test files only (``query/test``, ``cand_pool/local``,
``qrels/test``); its image paths stay relative to the M-BEIR root it was filtered from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from etils import epath

from elva_jax.data.errors import DataFormatError, utf8_lines

__all__ = [
    "MODALITIES",
    "Candidate",
    "MBEIRTask",
    "Query",
    "Qrels",
    "check_qrels_against_pool",
    "dataset_id_of",
    "instruction_key",
    "read_instructions",
    "read_mbeir_task",
    "read_mrbench",
    "read_pool",
    "read_qrels",
    "read_queries",
    "resolve_image_path",
]

MODALITIES = ("text", "image", "image,text", "video", "video,text")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Query:
    """One M-BEIR query. ``query_modality`` is one of MODALITIES; the cand lists hold did strings."""

    qid: str
    query_txt: str | None
    query_img_path: str | None
    query_modality: str
    pos_cand_list: tuple[str, ...]
    neg_cand_list: tuple[str, ...]
    task_id: int
    query_src_content: Any = dataclasses.field(default=None, hash=False, compare=False)
    query_video_path: str | None = None
    query_video_fps: float | None = None

    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.qid)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One pool entry. ``modality`` is one of MODALITIES."""

    did: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: Any = dataclasses.field(default=None, hash=False, compare=False)
    video_path: str | None = None
    video_fps: float | None = None

    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.did)


@dataclasses.dataclass(frozen=True)
class Qrels:
    """Parsed qrels file.

    positives: qid -> positive dids (file order, duplicates dropped); task_ids: qid -> task id;
    lines: (qid, did) -> 1-based line number (for error messages); path: the source file.
    """

    positives: Mapping[str, tuple[str, ...]]
    task_ids: Mapping[str, int]
    lines: Mapping[tuple[str, str], int]
    path: str

    def __len__(self) -> int:
        return len(self.positives)


@dataclasses.dataclass(frozen=True)
class MBEIRTask:
    """One evaluation task: its queries, its (local) pool did -> Candidate, and its qrels."""

    name: str
    queries: list[Query]
    pool: dict[str, Candidate]
    qrels: Qrels


def dataset_id_of(id_str: str) -> int:
    """Dataset id of a qid/did: ``"9:123" -> 9``. Raises ValueError for anything else."""
    head, sep, tail = str(id_str).partition(":")
    if not sep or not head.isdigit() or not tail:
        raise ValueError(f"expected an M-BEIR id 'dataset_id:index', got {id_str!r}")
    return int(head)


def instruction_key(dataset_id: int, query_modality: str, cand_modality: str) -> str:
    """Key into :func:`read_instructions`: ``"{dataset_id}, {query_modality}, {cand_modality}"``."""
    return f"{dataset_id}, {query_modality}, {cand_modality}"


def resolve_image_path(mbeir_root: str | Path, img_path: str, *, must_exist: bool = False) -> epath.Path:
    """``mbeir_root / img_path`` (an absolute ``img_path`` is returned as is); an ``etils.epath`` path, so
    a ``gs://`` root works as a local one.

    Raises FileNotFoundError when ``must_exist`` and the file is missing.
    """
    path = epath.Path(img_path)
    if not path.is_absolute():
        path = epath.Path(mbeir_root) / img_path
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"image {img_path!r} not found under {mbeir_root} ({path})")
    return path


# ----------------------------------------------------------------------------------------------------
# jsonl parsing helpers


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line, object) for each non-blank line; malformed lines raise DataFormatError."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _count_lines(path: Path) -> int:
    with epath.Path(path).open("rb") as f:
        return sum(1 for _ in f)


class _Fields:
    """Typed access to one record's fields; errors name the file, line and field."""

    def __init__(self, record: dict, path: Path, lineno: int):
        self.record, self.path, self.lineno = record, path, lineno

    def error(self, reason: str) -> DataFormatError:
        return DataFormatError(self.path, self.lineno, reason)

    def get(self, name: str, *, required: bool = True) -> Any:
        value = self.record.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise self.error(f"missing field {name!r}")
            return None
        return value

    def string(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"field {name!r} must be a non-empty string, got {value!r}")
        return value

    def optional_string(self, name: str, *, required: bool = True) -> str | None:
        value = self.get(name, required=required)
        if value is not None and not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string or null, got {type(value).__name__}")
        return value

    def video_fps(self, name: str, video: str | None) -> float | None:
        """An optional frame rate (a positive number or null), only beside a video field."""
        value = self.get(name, required=False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.error(f"field {name!r} must be a positive number (frames per second) or null, got {value!r}")
        if video is None or not video.strip():
            raise self.error(f"field {name!r} is given without a video")
        return float(value)

    def integer(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"field {name!r} must be an integer, got {value!r}")
        return value

    def id_list(self, name: str, *, non_empty: bool) -> tuple[str, ...]:
        value = self.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(f"field {name!r} must be a list of id strings, got {value!r}")
        if non_empty and not value:
            raise self.error(f"field {name!r} must not be empty")
        return tuple(value)

    def modality(self, name: str, fields: dict[str, str | None]) -> str:
        """``fields``: {field name: value} of the text, image and video fields, in that order."""
        value = self.get(name)
        if value not in MODALITIES:
            raise self.error(f"unknown {name} {value!r} (expected one of {', '.join(MODALITIES)})")
        has = [v is not None and bool(v.strip()) for v in fields.values()]
        want = [k in value.split(",") for k in ("text", "image", "video")][: len(has)]
        if has != want:
            present = ", ".join(f"{k}: {'present' if h else 'absent'}" for k, h in zip(fields, has))
            raise self.error(f"{name} {value!r} inconsistent with the fields present ({present})")
        return value


# ----------------------------------------------------------------------------------------------------
# readers


def read_queries(path: str | Path) -> list[Query]:
    """Query jsonl -> list of Query in file order. Duplicate qids are an error."""
    path = epath.Path(path)
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for lineno, record in _json_lines(path):
        f = _Fields(record, path, lineno)
        qid = f.string("qid")
        if qid in seen:
            raise f.error(f"duplicate qid {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        txt = f.optional_string("query_txt")
        img = f.optional_string("query_img_path")
        vid = f.optional_string("query_video_path", required=False)
        fields = {"query_txt": txt, "query_img_path": img, "query_video_path": vid}
        queries.append(
            Query(
                qid=qid,
                query_txt=txt,
                query_img_path=img,
                query_modality=f.modality("query_modality", fields),
                pos_cand_list=f.id_list("pos_cand_list", non_empty=True),
                neg_cand_list=f.id_list("neg_cand_list", non_empty=False),
                task_id=f.integer("task_id"),
                query_src_content=f.get("query_src_content"),
                query_video_path=vid,
                query_video_fps=f.video_fps("query_video_fps", vid),
            )
        )
    return queries


def read_pool(path: str | Path) -> dict[str, Candidate]:
    """Candidate pool jsonl -> {did: Candidate} in file order. Empty pools and duplicate dids are errors."""
    path = epath.Path(path)
    pool: dict[str, Candidate] = {}
    first_line: dict[str, int] = {}
    for lineno, record in _json_lines(path):
        f = _Fields(record, path, lineno)
        did = f.string("did")
        if did in pool:
            raise f.error(f"duplicate did {did!r} (first on line {first_line[did]})")
        first_line[did] = lineno
        txt = f.optional_string("txt")
        img = f.optional_string("img_path")
        vid = f.optional_string("video_path", required=False)
        pool[did] = Candidate(
            did=did,
            txt=txt,
            img_path=img,
            modality=f.modality("modality", {"txt": txt, "img_path": img, "video_path": vid}),
            src_content=f.get("src_content", required=False),
            video_path=vid,
            video_fps=f.video_fps("video_fps", vid),
        )
    if not pool:
        raise DataFormatError(path, _count_lines(path) + 1, "candidate pool is empty")
    return pool


def read_qrels(path: str | Path) -> Qrels:
    """qrels txt (``qid 0 did 1 task_id``) -> Qrels. Relevance must be a positive integer; a qid with two
    different task ids is an error; a repeated (qid, did) line is ignored."""
    path = epath.Path(path)
    positives: dict[str, list[str]] = {}
    task_ids: dict[str, int] = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, line in utf8_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise DataFormatError(path, lineno, f"expected 5 fields 'qid 0 did 1 task_id', got {len(parts)}")
        qid, iteration, did, rel, task = parts
        try:
            int(iteration)
            relevance, task_id = int(rel), int(task)
        except ValueError as e:
            raise DataFormatError(path, lineno, f"non-integer field in {line.strip()!r}") from e
        if relevance < 1:
            raise DataFormatError(path, lineno, f"relevance must be a positive integer, got {relevance}")
        if task_ids.setdefault(qid, task_id) != task_id:
            raise DataFormatError(path, lineno, f"qid {qid!r} has task ids {task_ids[qid]} and {task_id}")
        if (qid, did) in lines:
            continue
        lines[(qid, did)] = lineno
        positives.setdefault(qid, []).append(did)
    return Qrels(positives={q: tuple(d) for q, d in positives.items()}, task_ids=task_ids, lines=lines, path=str(path))


def check_qrels_against_pool(qrels: Qrels, pool: Mapping[str, Candidate], qrels_path: str | Path | None = None) -> None:
    """Raise DataFormatError (qrels file, line) for the first qrels did missing from ``pool``."""
    for (qid, did), lineno in qrels.lines.items():
        if did not in pool:
            raise DataFormatError(
                qrels_path if qrels_path is not None else qrels.path,
                lineno,
                f"did {did!r} (positive of qid {qid!r}) is not in the candidate pool",
            )


def read_instructions(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Instructions tsv -> {"{dataset_id}, {query_modality}, {cand_modality}": prompts}. The first line
    is a header; blank trailing cells are dropped; each row needs >= 1 prompt; duplicate keys are errors."""
    path = epath.Path(path)
    table: dict[str, tuple[str, ...]] = {}
    lines = utf8_lines(path)
    header = next(lines, (1, ""))[1]
    if not header.strip():
        raise DataFormatError(path, 1, "missing header line")
    for lineno, line in lines:
        if not line.strip():
            continue
        cells = [c.strip() for c in line.rstrip("\r\n").split("\t")]
        if len(cells) < 5:
            raise DataFormatError(
                path,
                lineno,
                f"expected >= 5 tab-separated cells (query_modality, cand_modality, dataset, "
                f"dataset_id, prompt...), got {len(cells)}",
            )
        qmod, cmod, _, dataset_id, *prompts = cells
        for name, mod in (("query modality", qmod), ("candidate modality", cmod)):
            if mod not in MODALITIES:
                raise DataFormatError(path, lineno, f"unknown {name} {mod!r}")
        if not dataset_id.isdigit():
            raise DataFormatError(path, lineno, f"dataset_id must be an integer, got {dataset_id!r}")
        prompts = [p for p in prompts if p]
        if not prompts:
            raise DataFormatError(path, lineno, "row has no prompt")
        key = instruction_key(int(dataset_id), qmod, cmod)
        if key in table:
            raise DataFormatError(path, lineno, f"duplicate instruction key {key!r}")
        table[key] = tuple(prompts)
    return table


def read_mbeir_task(root: str | Path, name: str, *, split: str = "test") -> MBEIRTask:
    """Load ``query/{split}/{name}_{split}.jsonl``, ``cand_pool/local/{name}_cand_pool.jsonl`` and
    ``qrels/{split}/{name}_{split}_qrels.txt`` under ``root``; qrels dids are checked against the pool."""
    root = epath.Path(root)
    queries = read_queries(root / "query" / split / f"{name}_{split}.jsonl")
    pool = read_pool(root / "cand_pool" / "local" / f"{name}_cand_pool.jsonl")
    qrels_path = root / "qrels" / split / f"{name}_{split}_qrels.txt"
    qrels = read_qrels(qrels_path)
    check_qrels_against_pool(qrels, pool, qrels_path)
    return MBEIRTask(name=name, queries=queries, pool=pool, qrels=qrels)


def read_mrbench(root: str | Path) -> dict[str, MBEIRTask]:
    """Every task of an MRBench directory (M-BEIR layout, test split only; see the module docstring),
    keyed by name (``query/test/{name}_test.jsonl``), sorted by name."""
    root = epath.Path(root)
    query_dir = root / "query" / "test"
    files = sorted(query_dir.glob("*_test.jsonl"))
    if not files:
        raise FileNotFoundError(f"no '*_test.jsonl' query files in {query_dir}")
    names = [f.name[: -len("_test.jsonl")] for f in files]
    return {name: read_mbeir_task(root, name, split="test") for name in names}
