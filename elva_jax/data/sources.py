"""Record sources: M-BEIR / MRBench / NLI tables read by index from local files, an HF ``datasets``
directory or ArrayRecord shards, on a local disk or behind a ``gs://`` path (``etils.epath``).

A *table* is a random-access sequence of row dicts (``len``, ``table[i]``, ``table.where(i)`` naming the
file and row of a message, ``table.column(name)`` for the small id columns). Row layouts:

- queries: ``qid, query_txt, query_img_path, query_modality, pos_cand_list, neg_cand_list, task_id,
  query_src_content, img_bytes``
- pool: ``did, txt, img_path, modality, src_content, img_bytes``
- nli: ``sent0, sent1, hard_neg``

A row with a video adds ``query_video_path`` / ``video_path``, ``query_video_fps`` / ``video_fps`` when
given, and in prepared tables ``video_bytes`` (a video file's bytes) or ``video_frames`` (a frame
folder's images' bytes, in the folder's natural order; both None when it was missing at preparation),
handed to the pipeline as the side's ``video_data``.

``img_bytes`` holds the image file's bytes in prepared tables (``None`` when the file was missing at
preparation, which the pipeline's image policy then treats exactly as a missing file) and is ``None``
in the files source, whose images are opened by path at encode time. ``*_src_content`` is stored as
JSON text in prepared tables.

A :class:`DataSource` opens a data root (``data.source``):

- ``"files"``: today's layout (M-BEIR jsonl + image files, NLI csv), parsed by :mod:`mbeir` / :mod:`nli`.
- ``"hf"``: a directory written by ``python -m elva_jax.data.prepare --format hf``: one
  ``datasets.Dataset.save_to_disk`` directory per table (Arrow, memory-mapped, random access).
- ``"array_record"``: ``--format array_record``: msgpack rows in ArrayRecord shards, read with Grain's
  ``ArrayRecordDataSource`` (random access).

Both prepared formats share ``manifest.json`` (``{"format", "backend", "tables": {name: {"kind",
"rows", "files", "columns"}}}``; a table is named by the relative path of the file it came from, e.g.
``query/train/x.jsonl``) and copy the small text files (instructions, qrels) as they are. A remote
prepared root (``gs://...``) is staged file by file into a local cache directory through epath first:
the Arrow memory map and ArrayRecord's C++ reader both need local files.

:class:`ContrastiveRecords` turns a query table and a pool table into the pipeline's records by index,
built exactly like :func:`elva_jax.data.pipeline.contrastive_records` (same ids, texts, instructions,
candidates), with the image bytes riding in each side's ``image_bytes``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from etils import epath

from elva_jax.data import mbeir, nli
from elva_jax.data.errors import RecordError, ShardRecordError
from elva_jax.errors import UserError

__all__ = [
    "MANIFEST",
    "SOURCES",
    "ConcatTable",
    "ContrastiveRecords",
    "CorpusRecords",
    "DataSource",
    "ListTable",
    "NLIRecords",
    "SourceError",
    "open_source",
    "open_table",
    "stage",
    "query_from_row",
    "candidate_from_row",
    "concat",
]

SOURCES = ("files", "hf", "array_record")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "elva_jax.prepared/1"
QUERY_COLUMNS = ("qid", "pos_cand_list", "neg_cand_list")  # kept beside ArrayRecord shards (no image read)
POOL_COLUMNS = ("did",)


class SourceError(UserError, ValueError):
    """A data root that does not fit the chosen source (no manifest, another backend, an unknown table)."""


# ----------------------------------------------------------------------------------------------------
# rows <-> Query / Candidate


def _json_or_none(text):
    return None if text is None else json.loads(text)


def _video_cols(prefix: str, path: str | None, fps: float | None, video: tuple | None) -> dict:
    """The video columns of a row with a video (none without): its path, its fps when given, and (prepared
    rows, ``video`` = (file bytes, frame bytes)) ``video_bytes`` / ``video_frames``."""
    if not path:
        return {}
    out = {f"{prefix}video_path": path, **({f"{prefix}video_fps": fps} if fps is not None else {})}
    if video is not None:
        out["video_bytes"], out["video_frames"] = video
    return out


def query_row(
    q: mbeir.Query, img_bytes: bytes | None = None, *, src_as_json: bool = False, video: tuple | None = None
) -> dict:
    src = json.dumps(q.query_src_content) if src_as_json else q.query_src_content
    return {
        "qid": q.qid,
        "query_txt": q.query_txt,
        "query_img_path": q.query_img_path,
        "query_modality": q.query_modality,
        "pos_cand_list": list(q.pos_cand_list),
        "neg_cand_list": list(q.neg_cand_list),
        "task_id": q.task_id,
        "query_src_content": src,
        "img_bytes": img_bytes,
        **_video_cols("query_", q.query_video_path, q.query_video_fps, video),
    }


def pool_row(
    c: mbeir.Candidate, img_bytes: bytes | None = None, *, src_as_json: bool = False, video: tuple | None = None
) -> dict:
    src = json.dumps(c.src_content) if src_as_json else c.src_content
    return {
        "did": c.did,
        "txt": c.txt,
        "img_path": c.img_path,
        "modality": c.modality,
        "src_content": src,
        "img_bytes": img_bytes,
        **_video_cols("", c.video_path, c.video_fps, video),
    }


def _need(row: dict, names: Sequence[str], where: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise ShardRecordError(where, f"missing field(s) {missing} (fields: {sorted(row)})")


def query_from_row(row: dict, where: str, *, src_is_json: bool) -> mbeir.Query:
    """A query row -> Query; a row lacking a field raises ShardRecordError naming ``where``."""
    _need(row, ("qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list"), where)
    src = row.get("query_src_content")
    return mbeir.Query(
        qid=row["qid"],
        query_txt=row["query_txt"],
        query_img_path=row["query_img_path"],
        query_modality=row["query_modality"],
        pos_cand_list=tuple(row["pos_cand_list"]),
        neg_cand_list=tuple(row["neg_cand_list"]),
        task_id=row.get("task_id", -1),
        query_src_content=_json_or_none(src) if src_is_json else src,
        query_video_path=row.get("query_video_path"),
        query_video_fps=row.get("query_video_fps"),
    )


def candidate_from_row(row: dict, where: str, *, src_is_json: bool) -> mbeir.Candidate:
    _need(row, ("did", "txt", "img_path", "modality"), where)
    src = row.get("src_content")
    return mbeir.Candidate(
        did=row["did"],
        txt=row["txt"],
        img_path=row["img_path"],
        modality=row["modality"],
        src_content=_json_or_none(src) if src_is_json else src,
        video_path=row.get("video_path"),
        video_fps=row.get("video_fps"),
    )


# ----------------------------------------------------------------------------------------------------
# tables


class ListTable:
    """Rows held in memory (the files source): ``where(i)`` names the file and the row."""

    src_is_json = False
    prepared = False

    def __init__(self, rows: list[dict], path: str):
        self.rows, self.path = rows, str(path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def where(self, i: int) -> str:
        return f"{self.path}, row {i}"

    def column(self, name: str) -> list:
        return [r[name] for r in self.rows]


class HFTable:
    """One ``datasets.Dataset`` directory (``load_from_disk``: Arrow files memory-mapped)."""

    src_is_json = True
    prepared = True

    def __init__(self, directory: str, dataset=None):
        import datasets

        self.path = str(directory)
        self.ds = dataset if dataset is not None else datasets.load_from_disk(self.path)

    @classmethod
    def from_parquet(cls, files: Sequence[str], cache_dir: str | None = None) -> HFTable:
        """Parquet file(s) -> one table (``Dataset.from_parquet``: converted once to Arrow, memory-mapped)."""
        import datasets

        ds = datasets.Dataset.from_parquet(list(files), cache_dir=cache_dir)
        return cls(files[0] if len(files) == 1 else os.path.dirname(files[0]), ds)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]

    def where(self, i: int) -> str:
        return f"{self.path}, row {i}"

    def column(self, name: str) -> list:
        return list(self.ds[name])


class ArrayRecordTable:
    """msgpack rows in ArrayRecord shards (Grain's ``ArrayRecordDataSource``); ``where(i)`` names the
    shard and the record's index inside it. ``columns`` holds the small id columns saved beside the shards."""

    src_is_json = True
    prepared = True

    def __init__(self, shards: Sequence[str], columns: dict[str, list]):
        import grain

        self.shards = [str(s) for s in shards]
        self.source = grain.sources.ArrayRecordDataSource(self.shards)
        self._columns = columns
        self._starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        import msgpack

        raw = self.source[int(i)]
        try:
            row = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # msgpack raises several unrelated types for corrupt input
            raise ShardRecordError(self.where(i), f"not a msgpack row ({type(e).__name__}: {e})") from None
        if not isinstance(row, dict):
            raise ShardRecordError(self.where(i), f"expected a msgpack map, got {type(row).__name__}")
        return row

    def where(self, i: int) -> str:
        if self._starts is None:
            from array_record.python.array_record_module import ArrayRecordReader

            starts, n = [], 0
            for s in self.shards:
                starts.append(n)
                reader = ArrayRecordReader(s)
                n += reader.num_records()
                reader.close()
            self._starts = starts
        k = max(j for j, s in enumerate(self._starts) if s <= i)
        return f"{self.shards[k]}, record {i - self._starts[k]}"

    def column(self, name: str) -> list:
        return list(self._columns[name])


class ConcatTable:
    """Tables one after another (several ``data.train_files``): row i of the concatenation."""

    def __init__(self, tables: Sequence):
        self.tables = list(tables)
        self.starts = [0]
        for t in self.tables:
            self.starts.append(self.starts[-1] + len(t))
        self.src_is_json = all(t.src_is_json for t in self.tables)
        self.prepared = all(t.prepared for t in self.tables)
        if len({t.src_is_json for t in self.tables}) > 1:
            raise ValueError("cannot concatenate tables of different sources")

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def __getitem__(self, i: int) -> dict:
        k, j = self._locate(int(i))
        return self.tables[k][j]

    def where(self, i: int) -> str:
        k, j = self._locate(int(i))
        return self.tables[k].where(j)

    def column(self, name: str) -> list:
        return [x for t in self.tables for x in t.column(name)]


def concat(tables: Sequence):
    return tables[0] if len(tables) == 1 else ConcatTable(tables)


# ----------------------------------------------------------------------------------------------------
# records by index


def _index(i, n: int) -> int:
    """``i`` as a row index in [0, n) (negative counts from the end); IndexError outside."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record {i} of {n}")
    return i


def _img_label(root, img_path: str | None) -> str | None:
    return str(mbeir.resolve_image_path(root, img_path)) if img_path else None


def _query_side(q: mbeir.Query, root, instruction) -> dict:
    from elva_jax.data.pipeline import _side

    video = _img_label(root, q.query_video_path)
    return _side(q.query_txt, _img_label(root, q.query_img_path), instruction, video, q.query_video_fps)


def _cand_side(c: mbeir.Candidate, root) -> dict:
    from elva_jax.data.pipeline import _side

    return _side(c.txt, _img_label(root, c.img_path), None, _img_label(root, c.video_path), c.video_fps)


def _attach(side: dict, row: dict, where: str) -> None:
    """A prepared row's media into its side: ``image_bytes`` for an image, ``video_data`` (the frames'
    bytes of a frame folder, else the file's bytes; None: missing at preparation) for a video, and
    ``where`` (shard and row) for the pipeline's messages."""
    if side["image"] is not None:
        side["image_bytes"], side["where"] = row.get("img_bytes"), where
    if side.get("video") is not None:
        frames = row.get("video_frames")
        side["video_data"] = list(frames) if frames is not None else row.get("video_bytes")
        side["where"] = where


class _RecordsByIndex(Sequence):
    """Records by index: ``self[i]`` is ``self._record(i)`` for i in [0, len) (negative counts from the
    end), a slice a list of records; subclasses give ``__len__`` and ``_record``."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        return self._record(_index(i, len(self)))

    def _record(self, i: int) -> dict:
        raise NotImplementedError


class ContrastiveRecords(_RecordsByIndex):
    """Query table + pool table -> pipeline records by index, equal (``image_bytes`` aside) to
    ``contrastive_records(queries, pool, root, instructions=..., num_negatives=...)``.

    Every query's candidates are checked against the pool's did column up front (RecordError naming
    the qid, as the list builder does; with ``dropped`` given, the skip policy, such a query is left
    out and its reason appended there); rows are read only when a record is asked for."""

    def __init__(
        self, queries, pool, root, *, instructions=None, num_negatives: int = 0, dropped: list[str] | None = None
    ):
        from elva_jax.data.pipeline import take_negatives

        self.queries, self.pool, self.root = queries, pool, root
        self.instructions, self.num_negatives = instructions, num_negatives
        self.pool_index = {did: i for i, did in enumerate(pool.column("did"))}
        self.cand_rows: list[list[int]] = []
        self.query_rows: list[int] = []  # record i is query row query_rows[i]
        for row, (qid, pos, neg) in enumerate(zip(*(queries.column(c) for c in QUERY_COLUMNS), strict=True)):
            try:
                if not pos:
                    raise RecordError(f"query {qid!r} has no positive candidate")
                dids = [pos[0], *take_negatives(neg, num_negatives, qid)]
                missing = [d for d in dids if d not in self.pool_index]
                if missing:
                    raise RecordError(f"query {qid!r}: candidates {missing} are not in the pool")
            except RecordError as e:
                if dropped is None:
                    raise
                dropped.append(str(e))
                continue
            self.cand_rows.append([self.pool_index[d] for d in dids])
            self.query_rows.append(row)

    def __len__(self) -> int:
        return len(self.query_rows)

    def candidate(self, row_index: int) -> tuple[mbeir.Candidate, dict]:
        """(the pool row's Candidate, the row itself)."""
        row = self.pool[row_index]
        return candidate_from_row(row, self.pool.where(row_index), src_is_json=self.pool.src_is_json), row

    def _record(self, i: int) -> dict:
        from elva_jax.data.pipeline import pick_instruction

        row = self.queries[self.query_rows[i]]
        where = self.queries.where(self.query_rows[i])
        q = query_from_row(row, where, src_is_json=self.queries.src_is_json)
        cands = [self.candidate(j) for j in self.cand_rows[i]]
        instr = pick_instruction(self.instructions, q.qid, q.query_modality, cands[0][0].modality)
        query = _query_side(q, self.root, instr)
        sides = [_cand_side(c, self.root) for c, _ in cands]
        # prepared tables carry the media bytes (None: missing at preparation), the files source the path only
        if self.queries.prepared:
            _attach(query, row, where)
        for s, (_, r), j in zip(sides, cands, self.cand_rows[i], strict=True):
            if self.pool.prepared:
                _attach(s, r, self.pool.where(j))
        return {"id": q.qid, "query": query, "cands": sides}


class CorpusRecords(_RecordsByIndex):
    """A pool or query table -> the corpus pipeline's records ``{"id", "item"}`` by index, equal (image
    bytes aside) to ``corpus_records(items, root, instructions=..., cand_modality=...)`` (evaluation:
    M-BEIR / MRBench pools and queries)."""

    def __init__(self, table, root, *, queries: bool = False, instructions=None, cand_modality: str | None = None):
        self.table, self.root, self.is_queries = table, root, queries
        self.instructions, self.cand_modality = instructions, cand_modality

    def __len__(self) -> int:
        return len(self.table)

    def _record(self, i: int) -> dict:
        from elva_jax.data.pipeline import pick_instruction

        row, where = self.table[i], self.table.where(i)
        if self.is_queries:
            q = query_from_row(row, where, src_is_json=self.table.src_is_json)
            instr = None
            if self.cand_modality:
                instr = pick_instruction(self.instructions, q.qid, q.query_modality, self.cand_modality)
            rid, item = q.qid, _query_side(q, self.root, instr)
        else:
            c = candidate_from_row(row, where, src_is_json=self.table.src_is_json)
            rid, item = c.did, _cand_side(c, self.root)
        if self.table.prepared:
            _attach(item, row, where)
        return {"id": rid, "item": item}


class NLIRecords(_RecordsByIndex):
    """NLI table -> records by index, equal to ``nli_records(rows, num_negatives=...)``."""

    def __init__(self, table, *, num_negatives: int = 0):
        if num_negatives not in (0, 1):
            raise ValueError("NLI rows carry at most one hard negative")
        self.table, self.num_negatives = table, num_negatives

    def __len__(self) -> int:
        return len(self.table)

    def _record(self, i: int) -> dict:
        from elva_jax.data.pipeline import nli_record

        row = self.table[i]
        _need(row, ("sent0", "sent1"), self.table.where(i))
        return nli_record(i, (row["sent0"], row["sent1"], row.get("hard_neg")), self.num_negatives)


# ----------------------------------------------------------------------------------------------------
# data roots


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def stage(remote_root: str, rel_paths: Sequence[str], cache_dir: str | None = None) -> str:
    """Copy ``rel_paths`` (files, or directories one or two levels deep) under ``remote_root`` (any epath
    URL) into a local cache directory, once (a file of the same size is kept); returns the local root.
    Default cache: ``~/.cache/elva_jax/sources``; one sub-directory per remote root."""
    base = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "elva_jax", "sources")
    local = os.path.join(base, hashlib.sha256(str(remote_root).encode()).hexdigest()[:16])
    remote = epath.Path(remote_root)
    for rel in rel_paths:
        src = remote / rel if rel else remote
        for s in [*src.glob("*"), *src.glob("*/*")] if src.is_dir() else [src]:
            if s.is_dir():
                continue
            dst = os.path.join(local, str(s)[len(str(remote)) + 1 :])
            size = s.stat().length
            if os.path.exists(dst) and os.path.getsize(dst) == size:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + ".part"
            with s.open("rb") as fi, open(tmp, "wb") as fo:
                while chunk := fi.read(1 << 22):
                    fo.write(chunk)
            os.replace(tmp, dst)
    return local


def open_table(path: str, *, cache_dir: str | None = None):
    """Any table by path, for readers of other layouts (e.g. MMEB): an HF ``save_to_disk`` directory
    (``load_from_disk``), a ``.parquet`` file or a directory of them (``Dataset.from_parquet``, converted
    once into Arrow under ``cache_dir`` and memory-mapped), or ``.array_record`` shard(s) / a directory
    of them (msgpack rows). A remote path (``gs://``) is staged into ``cache_dir`` first. Rows are the
    stored columns as they are (no M-BEIR conversion)."""
    p = epath.Path(path)
    if _is_remote(path):
        if p.is_dir():
            local_root = stage(path, [""], cache_dir)
        else:
            local_root = os.path.join(stage(str(p.parent), [p.name], cache_dir), p.name)
        path = local_root
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if "state.json" in names:
            return HFTable(path)
        parquet = [os.path.join(path, n) for n in names if n.endswith(".parquet")]
        shards = [os.path.join(path, n) for n in names if n.endswith(".array_record")]
        if parquet:
            return HFTable.from_parquet(parquet, cache_dir)
        if shards:
            return ArrayRecordTable(shards, {})
        raise SourceError(f"{path}: no HF dataset (state.json), .parquet or .array_record files")
    if path.endswith(".parquet"):
        return HFTable.from_parquet([path], cache_dir)
    if path.endswith(".array_record"):
        return ArrayRecordTable([path], {})
    raise SourceError(f"{path}: not an HF dataset directory, a .parquet or an .array_record file")


class DataSource:
    """A data root opened with one of SOURCES. ``queries(name)`` / ``pool(name)`` / ``nli(name)`` give
    tables (names are paths relative to the root, as in ``data.train_files``), ``instructions(name)``
    the parsed instruction table or None when the file is absent, ``image_root`` the path image labels
    are resolved against (a prepared root: the directory it was prepared from)."""

    def __init__(self, root: str, kind: str = "files", *, cache_dir: str | None = None):
        if kind not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {kind!r}")
        self.kind, self.root = kind, str(root)
        self.manifest: dict[str, Any] | None = None
        self._local = self.root
        self.image_root = self.root  # image labels (messages, caches) name the original files
        if kind != "files":
            mpath = epath.Path(self.root) / MANIFEST
            if not mpath.exists():
                raise SourceError(
                    f"{mpath}: no manifest; data.source={kind!r} reads a directory written by "
                    f"`python -m elva_jax.data.prepare --format {kind}`"
                )
            self.manifest = json.loads(mpath.read_text())
            if self.manifest.get("format") != MANIFEST_FORMAT or self.manifest.get("backend") != kind:
                raise SourceError(
                    f"{mpath}: written as {self.manifest.get('backend')!r} ({self.manifest.get('format')}), "
                    f"not as data.source={kind!r}"
                )
            self.image_root = self.manifest.get("source_root") or self.root
            if _is_remote(self.root):
                self._local = self._stage(cache_dir)

    def _stage(self, cache_dir: str | None) -> str:
        files = [MANIFEST]
        for t in self.manifest["tables"].values():
            files += t["files"] + ([t["columns"]] if t.get("columns") else [])
        files += self.manifest.get("text_files", [])
        return stage(self.root, files, cache_dir)

    def _table(self, name: str, kind: str):
        assert self.manifest is not None
        entry = self.manifest["tables"].get(name)
        if entry is None:
            raise SourceError(
                f"{self.root}: no table {name!r} in {MANIFEST} (tables: {sorted(self.manifest['tables'])})"
            )
        if entry["kind"] != kind:
            raise SourceError(f"{self.root}: table {name!r} holds {entry['kind']} rows, not {kind}")
        files = [os.path.join(self._local, f) for f in entry["files"]]
        if self.kind == "hf":
            return HFTable(files[0])
        columns = {}
        if entry.get("columns"):
            with open(os.path.join(self._local, entry["columns"])) as f:
                columns = json.load(f)
        return ArrayRecordTable(files, columns)

    def queries(self, name: str):
        if self.kind == "files":
            path = epath.Path(self.root) / name
            return ListTable([query_row(q) for q in mbeir.read_queries(path)], path)
        return self._table(name, "queries")

    def pool(self, name: str):
        if self.kind == "files":
            path = epath.Path(self.root) / name
            return ListTable([pool_row(c) for c in mbeir.read_pool(path).values()], path)
        return self._table(name, "pool")

    def nli(self, name: str | None = None):
        """The NLI table ``name``; None: the files source reads the root itself as the csv, a prepared
        root its only NLI table."""
        if self.kind == "files":
            path = epath.Path(self.root) / name if name else epath.Path(self.root)
            rows = [{"sent0": a, "sent1": b, "hard_neg": c} for a, b, c in nli.read_nli_csv(path)]
            return ListTable(rows, path)
        if name is None:
            names = [n for n, t in self.manifest["tables"].items() if t["kind"] == "nli"]
            if len(names) != 1:
                raise SourceError(f"{self.root}: expected exactly one NLI table, found {names}")
            name = names[0]
        return self._table(name, "nli")

    def text_path(self, name: str):
        """Path of a small text file under the root (staged locally for a remote prepared root)."""
        return epath.Path(self._local) / name

    def instructions(self, name: str) -> dict[str, tuple[str, ...]] | None:
        path = self.text_path(name)
        return mbeir.read_instructions(path) if path.exists() else None


def open_source(root: str, kind: str = "files", *, cache_dir: str | None = None) -> DataSource:
    return DataSource(root, kind, cache_dir=cache_dir)
