"""Table rows <-> M-BEIR :class:`~elva_jax.data.benchmarks.mbeir.Query` / ``Candidate``.

Row layouts:

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
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from elva_jax.data.benchmarks import mbeir
from elva_jax.data.errors import ShardRecordError

__all__ = [
    "POOL_COLUMNS",
    "QUERY_COLUMNS",
    "candidate_from_row",
    "need_fields",
    "pool_row",
    "query_from_row",
    "query_row",
]

QUERY_COLUMNS = ("qid", "pos_cand_list", "neg_cand_list")  # kept beside ArrayRecord shards (no image read)
POOL_COLUMNS = ("did",)


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


def need_fields(row: dict, names: Sequence[str], where: str) -> None:
    """Raise ShardRecordError naming ``where`` when ``row`` lacks any of ``names``."""
    missing = [n for n in names if n not in row]
    if missing:
        raise ShardRecordError(where, f"missing field(s) {missing} (fields: {sorted(row)})")


def query_from_row(row: dict, where: str, *, src_is_json: bool) -> mbeir.Query:
    """A query row -> Query; a row lacking a field raises ShardRecordError naming ``where``."""
    need_fields(row, ("qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list"), where)
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
    need_fields(row, ("did", "txt", "img_path", "modality"), where)
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
