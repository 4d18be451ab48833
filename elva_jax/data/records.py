"""The pipeline's records: plain, picklable dicts built from M-BEIR queries and pools, NLI rows or RL
instances (lists), or read by index from tables (:class:`ContrastiveRecords`, :class:`CorpusRecords`,
:class:`NLIRecords`: the same records, with a prepared table's media bytes riding in each side).

A side is ``{"text", "image", "instruction"}`` plus ``"video"`` (and ``"video_fps"``) when it has one.
Contrastive / NLI / RL records are ``{"id", "query", "cands": [positive, *negatives]}``, corpus records
``{"id", "item"}``. Instructions are chosen deterministically: prompt ``crc32(qid) % len(prompts)`` of the
instruction table entry for (dataset, query modality, candidate modality).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from elva_jax.data.benchmarks.mbeir import Candidate, Query, dataset_id_of, instruction_key, resolve_image_path
from elva_jax.data.errors import RecordError
from elva_jax.data.prompts import choose_instruction
from elva_jax.data.rows import QUERY_COLUMNS, candidate_from_row, need_fields, query_from_row

__all__ = [
    "ContrastiveRecords",
    "CorpusRecords",
    "NLIRecords",
    "contrastive_records",
    "corpus_records",
    "nli_record",
    "nli_records",
    "pick_instruction",
    "rl_records",
    "take_negatives",
]


# ----------------------------------------------------------------------------------------------------
# record lists (pure python, picklable dicts)


def _side(
    text: str | None,
    image: str | None,
    instruction: str | None = None,
    video: str | None = None,
    video_fps: float | None = None,
) -> dict:
    """A side dict; ``"video"`` only when there is one, ``"video_fps"`` (a frame folder's rate) only when
    given (records without video are unchanged)."""
    s = {"text": text, "image": image, "instruction": instruction}
    if video is not None:
        s["video"] = video
        if video_fps is not None:
            s["video_fps"] = video_fps
    return s


def _media(root, path: str | None) -> str | None:
    """An image or video path of a record resolved against the data root (None stays None)."""
    return str(resolve_image_path(root, path)) if path else None


def pick_instruction(instructions: dict[str, tuple[str, ...]] | None, qid: str, qmod: str, cmod: str) -> str | None:
    if not instructions:
        return None
    prompts = instructions.get(instruction_key(dataset_id_of(qid), qmod, cmod))
    if not prompts:
        return None
    return choose_instruction(prompts, qid)


def _cand_side(c: Candidate, root: str | Path) -> dict:
    return _side(c.txt, _media(root, c.img_path), None, _media(root, c.video_path), c.video_fps)


def take_negatives(negs: Sequence[str], k: int, qid: str) -> list[str]:
    """First k of neg_cand_list (list order); cycled when shorter. Raises when none exist and k > 0."""
    if k == 0:
        return []
    if not negs:
        raise RecordError(f"query {qid!r} has no neg_cand_list entries but {k} hard negatives were asked")
    return [negs[i % len(negs)] for i in range(k)]


def contrastive_records(
    queries: Sequence[Query],
    pool: dict[str, Candidate],
    root: str | Path,
    *,
    instructions: dict[str, tuple[str, ...]] | None = None,
    num_negatives: int = 0,
    dropped: list[str] | None = None,
) -> list[dict]:
    """M-BEIR queries + pool -> [{"id", "query", "cands": [positive, *negatives]}]; the positive is the
    first pos_cand, negatives the first k of neg_cand_list (deterministic).

    A query that cannot make a record (no positive, a candidate missing from the pool, no negatives to
    take) raises RecordError naming it; with ``dropped`` given (the skip policy) it is left out instead
    and its "qid: reason" appended there, so the caller counts and reports it."""
    out = []
    for q in queries:
        try:
            out.append(_contrastive_record(q, pool, root, instructions, num_negatives))
        except RecordError as e:
            if dropped is None:
                raise
            dropped.append(str(e))
    return out


def _contrastive_record(q: Query, pool: dict[str, Candidate], root, instructions, num_negatives: int) -> dict:
    if not q.pos_cand_list:
        raise RecordError(f"query {q.qid!r} has no positive candidate")
    dids = [q.pos_cand_list[0], *take_negatives(q.neg_cand_list, num_negatives, q.qid)]
    missing = [d for d in dids if d not in pool]
    if missing:
        raise RecordError(f"query {q.qid!r}: candidates {missing} are not in the pool")
    cmod = pool[dids[0]].modality
    instr = pick_instruction(instructions, q.qid, q.query_modality, cmod)
    query = _side(
        q.query_txt, _media(root, q.query_img_path), instr, _media(root, q.query_video_path), q.query_video_fps
    )
    return {"id": q.qid, "query": query, "cands": [_cand_side(pool[d], root) for d in dids]}


def nli_records(rows: Sequence[tuple[str, str, str | None]], *, num_negatives: int = 0) -> list[dict]:
    """NLI triples -> records (sent0 query, sent1 positive, hard_neg negative when num_negatives=1)."""
    if num_negatives not in (0, 1):
        raise ValueError("NLI rows carry at most one hard negative")
    return [nli_record(i, row, num_negatives) for i, row in enumerate(rows)]


def nli_record(i: int, row: tuple[str, str, str | None], num_negatives: int) -> dict:
    """Row i of an NLI table -> its record (id ``"nli:{i}"``)."""
    s0, s1, neg = row
    cands = [_side(s1, None)]
    if num_negatives:
        if neg is None:
            raise ValueError(f"NLI row {i} has no hard_neg")
        cands.append(_side(neg, None))
    return {"id": f"nli:{i}", "query": _side(s0, None), "cands": cands}


def rl_records(
    instances: Sequence[dict], pool: dict[str, Candidate], root: str | Path, *, num_negatives: int
) -> list[dict]:
    """RL instances ``{"query": Query, "positive": did, "negatives": [did, ...]}`` -> records with
    exactly 1 + num_negatives candidates (negatives cycled when short)."""
    out = []
    for inst in instances:
        q: Query = inst["query"]
        dids = [inst["positive"], *take_negatives(list(inst["negatives"]), num_negatives, q.qid)]
        img, vid = _media(root, q.query_img_path), _media(root, q.query_video_path)
        out.append(
            {
                "id": q.qid,
                "query": _side(q.query_txt, img, inst.get("instruction"), vid, q.query_video_fps),
                "cands": [_cand_side(pool[d], root) for d in dids],
            }
        )
    return out


def corpus_records(
    items: Sequence[Candidate] | Sequence[Query],
    root: str | Path,
    *,
    instructions: dict[str, tuple[str, ...]] | None = None,
    cand_modality: str | None = None,
) -> list[dict]:
    """Pool candidates or queries -> [{"id", "item"}] for embedding (queries get their instruction
    when ``instructions`` and ``cand_modality`` are given)."""
    out = []
    for it in items:
        if isinstance(it, Query):
            img, vid = _media(root, it.query_img_path), _media(root, it.query_video_path)
            instr = pick_instruction(instructions, it.qid, it.query_modality, cand_modality) if cand_modality else None
            out.append({"id": it.qid, "item": _side(it.query_txt, img, instr, vid, it.query_video_fps)})
        else:
            out.append({"id": it.did, "item": _cand_side(it, root)})
    return out


# ----------------------------------------------------------------------------------------------------
# records by index (tables)


def _index(i, n: int) -> int:
    """``i`` as a row index in [0, n) (negative counts from the end); IndexError outside."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record {i} of {n}")
    return i


def _query_side(q: Query, root, instruction) -> dict:
    video = _media(root, q.query_video_path)
    return _side(q.query_txt, _media(root, q.query_img_path), instruction, video, q.query_video_fps)


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

    def candidate(self, row_index: int) -> tuple[Candidate, dict]:
        """(the pool row's Candidate, the row itself)."""
        row = self.pool[row_index]
        return candidate_from_row(row, self.pool.where(row_index), src_is_json=self.pool.src_is_json), row

    def _record(self, i: int) -> dict:
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
        row = self.table[i]
        need_fields(row, ("sent0", "sent1"), self.table.where(i))
        return nli_record(i, (row["sent0"], row["sent1"], row.get("hard_neg")), self.num_negatives)
