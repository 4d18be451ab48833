"""MMEB image and visual-document tasks -> :class:`~elva_jax.data.benchmarks.mmeb.tasks.MMEBTask`.

- image (``ziyjiang/MMEB_Test_Instruct``, one config per task, split test): ``qry_inst``, ``qry_text``,
  ``qry_img_path``, ``tgt_inst``, ``tgt_text`` (list), ``tgt_img_path`` (list); candidate 0 is the
  positive. Candidate names: the text (image_cls / image_qa / image_i2t), the image path (image_t2i),
  ``path + ":" + caption.strip('"')`` (image_i2i_vg). Image paths are relative to ``image-tasks/``.
- visual documents (BEIR triple ``queries`` / ``corpus`` / ``qrels``): ``query-id``, ``query``;
  ``corpus-id``, ``image``; ``query-id``, ``corpus-id``, ``score``. Qrels with score <= 0 are dropped,
  a repeated pair keeps its highest score (``load_qrels_mapping``); the corpus is ranked whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from elva_jax.data.benchmarks.mmeb.hf import column, from_cache, load_dataset_dir, nonempty
from elva_jax.data.benchmarks.mmeb.tasks import MMEBDataError, MMEBTask, Side

__all__ = [
    "IMAGE_PARSERS",
    "VISDOC_CAND_INSTRUCTION",
    "VISDOC_PARSERS",
    "VISDOC_QUERY_INSTRUCTION",
    "image_task",
    "visdoc_task",
]

VISDOC_QUERY_INSTRUCTION = "Find a document image that matches the given query:"
VISDOC_CAND_INSTRUCTION = "Understand the content of the provided document image."

IMAGE_PARSERS = ("image_cls", "image_qa", "image_i2t", "image_t2i", "image_i2i_vg")
VISDOC_PARSERS = ("vidore", "visrag")


def _clean_inst(s: str | None) -> str | None:
    s = (s or "").replace("<|image_1|>", "").strip()
    return s or None


def image_task(spec: dict, root: Path) -> MMEBTask:
    name, parser = spec["name"], spec["parser"]
    d = root / "image" / name
    ds = load_dataset_dir(d) if d.is_dir() else from_cache(name, None, d)
    where = str(d)
    img_root = root / spec.get("image_root", "image-tasks")
    cols = {c: column(ds, c, where) for c in ("qry_inst", "qry_text", "qry_img_path", "tgt_text")}
    with_tgt_img = parser in ("image_t2i", "image_i2i_vg")
    if with_tgt_img:
        cols["tgt_inst"] = column(ds, "tgt_inst", where)
        cols["tgt_img_path"] = column(ds, "tgt_img_path", where)
    names: list[str] = []
    index: dict[str, int] = {}
    cands: list[Side] = []
    queries, qids, local, relevant = [], [], [], []
    for i in range(len(ds)):
        texts = cols["tgt_text"][i]
        nonempty(texts, where, i, "tgt_text")
        qimg = cols["qry_img_path"][i] if parser != "image_t2i" else None  # t2i queries are text only in VLM2Vec
        queries.append(
            Side(
                text=cols["qry_text"][i] or None,
                image=str(img_root / qimg) if qimg else None,
                instruction=_clean_inst(cols["qry_inst"][i]),
            )
        )
        qids.append(f"{name}:{i}")
        if with_tgt_img:
            paths = cols["tgt_img_path"][i]
            nonempty(paths, where, i, "tgt_img_path")
            if len(paths) != len(texts):
                raise MMEBDataError(f"{where}, row {i}: {len(texts)} tgt_text but {len(paths)} tgt_img_path")
            inst = _clean_inst(cols["tgt_inst"][i])
            row = []
            for p, t in zip(paths, texts):
                key = p if parser == "image_t2i" else f"{p}:{t.strip(chr(34))}"
                row.append(
                    (key, Side(text=t.strip() or None, image=str(img_root / p) if p else None, instruction=inst))
                )
        else:
            row = [(t, Side(text=t)) for t in texts]
        idx = []
        for key, side in row:
            if key not in index:
                index[key] = len(names)
                names.append(key)
                cands.append(side)
            idx.append(index[key])
        local.append(idx)
        relevant.append({idx[0]: 1.0})
    if not queries:
        raise MMEBDataError(f"{where}: no rows")
    return MMEBTask(name, "image", spec["meta_task"], parser, where, qids, queries, cands, names, relevant, local)


def visdoc_task(spec: dict, root: Path, materialize_dir: Path | None) -> MMEBTask:
    import datasets

    name = spec["name"]
    d = root / "visdoc" / name
    parts = {}
    for p in ("queries", "corpus", "qrels"):
        parts[p] = load_dataset_dir(d / p) if d.is_dir() else from_cache(name, p, d)
    q, c, r = parts["queries"], parts["corpus"], parts["qrels"]
    where = str(d)
    if "image" not in c.column_names:
        raise MMEBDataError(f"{where}/corpus: column 'image' missing (has {c.column_names})")
    c = c.cast_column("image", datasets.Image(decode=False))
    column(c, "corpus-id", f"{where}/corpus")
    corpus: dict[str, Side] = {}
    for i, row in enumerate(c):  # row by row: the corpus images stay memory-mapped
        cid, im = str(row["corpus-id"]), row["image"]
        if cid in corpus:
            continue  # VLM2Vec keeps a corpus id's first row
        if im is None:
            raise MMEBDataError(f"{where}/corpus, row {i}: corpus-id {cid!r} has no image")
        if im.get("bytes"):
            if materialize_dir is None:
                raise MMEBDataError(f"{where}/corpus: embedded images need a directory to be written to")
            out = materialize_dir / name / f"{cid}.png"
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the directory never collide
                tmp.write_bytes(im["bytes"])
                tmp.replace(out)
            path = str(out)
        elif im.get("path"):
            path = im["path"] if Path(im["path"]).is_absolute() else str(d / "corpus" / im["path"])
        else:
            raise MMEBDataError(f"{where}/corpus, row {i}: image of {cid!r} has neither bytes nor a path")
        corpus[cid] = Side(image=path, instruction=VISDOC_CAND_INSTRUCTION)
    qrels: dict[str, dict[str, float]] = {}
    rq = column(r, "query-id", f"{where}/qrels")
    rc = column(r, "corpus-id", f"{where}/qrels")
    rs = column(r, "score", f"{where}/qrels")
    for i, (qid, cid, s) in enumerate(zip(rq, rc, rs)):
        if s > 0:
            m = qrels.setdefault(str(qid), {})
            m[str(cid)] = max(m.get(str(cid), 0.0), float(s))
            if str(cid) not in corpus:
                raise MMEBDataError(f"{where}/qrels, row {i}: corpus-id {cid!r} is not in the corpus")
    qcol = column(q, "query-id", f"{where}/queries")
    texts = column(q, "query", f"{where}/queries")
    for i, qid in enumerate(qcol):
        if str(qid) not in qrels:
            raise MMEBDataError(f"{where}/queries, row {i}: query-id {qid!r} has no qrels with score > 0")
    if not qcol:
        raise MMEBDataError(f"{where}/queries: no rows")
    # candidate order as VLM2Vec's generate_cand_dataset: each query's qrels documents, then the corpus
    names: list[str] = []
    index: dict[str, int] = {}
    for cid in [c for qid in qcol for c in qrels[str(qid)]] + list(corpus):
        if cid not in index:
            index[cid] = len(names)
            names.append(cid)
    cands = [corpus[n] for n in names]
    qids = [str(x) for x in qcol]
    queries = [Side(text=t, instruction=VISDOC_QUERY_INSTRUCTION) for t in texts]
    relevant = [{index[cid]: g for cid, g in qrels[qid].items()} for qid in qids]
    return MMEBTask(name, "visdoc", spec["meta_task"], spec["parser"], where, qids, queries, cands, names, relevant)
