"""MMEB-V2 scoring: embeddings of a task's queries and candidates -> the metric VLM2Vec reports, and the
per meta-task / modality / overall averages.

Scores are inner products of the (L2-normalised) embeddings, s[q, c] = <e_q, e_c>, as VLM2Vec's eval
(``np.dot(qry, cand.T)``). A local task ranks each query's own candidate row (in row order, the positive
first, duplicates of a name kept: they share one embedding, so they tie); a global task ranks every
candidate (in VLM2Vec's order: each query's candidates, then the corpus). Ranking: score descending,
ties to the earlier position (a stable sort; VLM2Vec's
``np.argsort(-s)`` leaves tie order to numpy's quicksort). Metrics (VLM2Vec ``RankingMetrics``):

- hit@k = 1 if any relevant candidate is among the top k (image and video tasks report hit@1);
- NDCG@k, linear gain (``ndcg_linear@5`` for visual documents): sum_{j<k} r_j / log2(j + 2) over the
  ranked grades r (qrels scores), divided by the same over the grades sorted descending.

Averages (``experiments/report_score_v2.py``): the mean of the reported metric over the scored tasks of
each meta-task, of each modality, and over all scored tasks. Skipped tasks (a parser not implemented, or
video tasks with an embedder that takes no video) are listed, never scored. Video queries / candidates
are embedded from their files (:mod:`elva_jax.data.media.video`, at the run's ``data.video_*`` settings).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from elva_jax.data.benchmarks.mmeb.reader import SUPPORTED_PARSERS, load_task, select, task_table
from elva_jax.data.benchmarks.mmeb.tasks import MMEBTask
from elva_jax.eval.embed import Embedder
from elva_jax.eval.embed_cache import records_digest
from elva_jax.retrieval.metrics import ndcg_from_topk, recall_from_topk

__all__ = [
    "METRIC",
    "averages",
    "evaluate_tasks",
    "load_tasks",
    "ranked_candidates",
    "score_task",
    "video_inputs_available",
    "write_reports",
]

#: the metric VLM2Vec reports per modality
METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
HIT_KS = (1, 5, 10)
NDCG_K = 5
_BLOCK = 1024


def ranked_candidates(task: MMEBTask, q_emb: np.ndarray, c_emb: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k]: each query's best k candidate indices (score descending, ties to the earlier row
    position / candidate index), -1 where a query has fewer than k candidates."""
    q_emb = np.asarray(q_emb, dtype=np.float32)
    c_emb = np.asarray(c_emb, dtype=np.float32)
    n_q = len(task.queries)
    if q_emb.shape[0] != n_q or c_emb.shape[0] != len(task.candidates):
        raise ValueError(
            f"{task.name}: {q_emb.shape[0]} / {c_emb.shape[0]} embeddings for {n_q} queries / "
            f"{len(task.candidates)} candidates"
        )
    out = np.full((n_q, k), -1, dtype=np.int64)
    if task.local is None:
        for r0 in range(0, n_q, _BLOCK):
            s = q_emb[r0 : r0 + _BLOCK] @ c_emb.T
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            out[r0 : r0 + _BLOCK, : order.shape[1]] = order
        return out
    for q, row in enumerate(task.local):
        idx = np.asarray(row, dtype=np.int64)
        s = c_emb[idx] @ q_emb[q]
        order = np.argsort(-s, kind="stable")[:k]
        out[q, : order.size] = idx[order]
    return out


def score_task(task: MMEBTask, q_emb: np.ndarray, c_emb: np.ndarray) -> dict:
    """{"metric", "score", "hit@1", "hit@5", "hit@10", "ndcg_linear@5", "n_queries", "n_candidates", ...}."""
    k = max(max(HIT_KS), NDCG_K)
    ranked = ranked_candidates(task, q_emb, c_emb, k)
    rel_sets = [set(r) for r in task.relevant]
    r = {f"hit@{h}": recall_from_topk(ranked, rel_sets, h) for h in HIT_KS}
    r[f"ndcg_linear@{NDCG_K}"] = float(np.mean(ndcg_from_topk(ranked, task.relevant, NDCG_K, "linear")))
    metric = METRIC[task.modality]
    sizes = [len(x) for x in task.local] if task.local is not None else [len(task.candidates)]
    return {
        "modality": task.modality,
        "meta_task": task.meta_task,
        "parser": task.parser,
        "eval_type": task.eval_type,
        "status": "ok",
        "metric": metric,
        "score": r[metric],
        **r,
        "n_queries": len(task.queries),
        "n_candidates": len(task.candidates),
        "candidates_per_query": [min(sizes), max(sizes)],
        "source": task.source,
    }


def averages(per_task: dict[str, dict]) -> dict:
    """Mean reported metric per ``{modality}/{meta_task}``, per modality and over all scored tasks
    (``"all"``); each {"score", "n_tasks", "skipped": [names]}."""
    groups: dict[str, list[float]] = {}
    skipped: dict[str, list[str]] = {}
    for name, r in per_task.items():
        keys = (f"{r['modality']}/{r['meta_task']}", r["modality"], "all")
        for key in keys:
            groups.setdefault(key, [])
            skipped.setdefault(key, [])
            if r["status"] == "ok":
                groups[key].append(r["score"])
            else:
                skipped[key].append(name)
    out = {}
    order = sorted(groups, key=lambda k: (k == "all", "/" not in k))  # meta-tasks, modalities, overall
    for key in order:
        v = groups[key]
        out[key] = {"score": float(np.mean(v)) if v else None, "n_tasks": len(v), "skipped": skipped[key]}
    return out


# ----------------------------------------------------------------------------------------------------
# a run


def video_inputs_available() -> bool:
    """Whether the embedder takes video records (``Embedder.video_inputs``, True since the corpus pipeline
    decodes video sides); an embedder without it gets video tasks reported as skipped."""
    return bool(getattr(Embedder, "video_inputs", False))


def load_tasks(root, names=(), *, materialize_dir=None, max_queries: int = 0) -> list[MMEBTask | dict]:
    """Every task of ``root`` (or the named ones) read and validated; a task whose parser is not supported
    stays its spec dict (reported as skipped). ``max_queries`` > 0 keeps the first N queries of each task
    (global tasks keep their whole corpus)."""
    out: list[MMEBTask | dict] = []
    for spec in select(task_table(root), names):
        if spec["parser"] not in SUPPORTED_PARSERS:
            out.append(spec)
            continue
        t = load_task(spec, root, materialize_dir=materialize_dir)
        if max_queries > 0:
            n = max_queries
            t = dataclasses.replace(
                t,
                query_ids=t.query_ids[:n],
                queries=t.queries[:n],
                relevant=t.relevant[:n],
                local=None if t.local is None else t.local[:n],
            )
        out.append(t)
    return out


def _records(ids, sides) -> list[dict]:
    return [{"id": i, "item": s.item()} for i, s in zip(ids, sides)]


def evaluate_tasks(tasks: list[MMEBTask | dict], embedder: Embedder, emb_kw: dict, *, log=print) -> dict:
    """Embed (cached under ``emb_kw``) and score every task; {"tasks", "averages", "embedding", "timing"}."""
    per_task: dict[str, dict] = {}
    t_embed = 0.0
    video_ok = video_inputs_available()
    for t in tasks:
        if isinstance(t, dict):
            per_task[t["name"]] = {
                "modality": t["modality"],
                "meta_task": t["meta_task"],
                "parser": t["parser"],
                "status": f"skipped: parser {t['parser']!r} not implemented",
                "metric": METRIC[t["modality"]],
                "score": None,
            }
            log(f"[elva_jax.eval] {t['name']}: {per_task[t['name']]['status']}")
            continue
        if t.has_video and not video_ok:
            per_task[t.name] = {
                "modality": t.modality,
                "meta_task": t.meta_task,
                "parser": t.parser,
                "eval_type": t.eval_type,
                "status": "skipped: video inputs not available",
                "metric": METRIC[t.modality],
                "score": None,
                "n_queries": len(t.queries),
                "n_candidates": len(t.candidates),
                "source": t.source,
            }
            log(f"[elva_jax.eval] {t.name}: skipped (video inputs not available)")
            continue
        t0 = time.perf_counter()
        crecs = _records([f"{t.name}:cand:{n}" for n in t.cand_names], t.candidates)
        qrecs = _records(t.query_ids, t.queries)
        c_emb = np.asarray(embedder.embed(crecs, name=f"mmeb.cands.{t.name}.{records_digest(crecs)[:10]}", **emb_kw))
        q_emb = np.asarray(embedder.embed(qrecs, name=f"mmeb.queries.{t.name}.{records_digest(qrecs)[:10]}", **emb_kw))
        t_embed += time.perf_counter() - t0
        per_task[t.name] = score_task(t, q_emb, c_emb)
        r = per_task[t.name]
        n = f"({r['n_queries']} q, {r['n_candidates']} cands)"
        log(f"[elva_jax.eval] {t.name}: {r['metric']} {100 * r['score']:.1f} {n}")
    return {
        "tasks": per_task,
        "averages": averages(per_task),
        "embedding": embedder.stats,
        "timing": {"embed_s": t_embed},
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def write_reports(results: dict, out) -> dict:
    """results.json and results.md (one row per task, then the meta-task, modality and overall averages)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "md": str(out / "results.md")}
    results = {**results, "files": paths}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    s = results["settings"]
    lines = [
        f"# MMEB-V2 results ({s['mode']} embedding)",
        "",
        "| Task | Modality | Meta-task | Metric | Score | Queries | Candidates | Status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        row = [name, r["modality"], r["meta_task"], r["metric"], _pct(r["score"])]
        row += [str(r.get("n_queries", "")), str(r.get("n_candidates", "")), r["status"]]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| Average | Score | Tasks scored | Skipped |", "|---|---|---|---|"]
    for key, a in results["averages"].items():
        label = "**Overall**" if key == "all" else key
        lines.append(f"| {label} | {_pct(a['score'])} | {a['n_tasks']} | {', '.join(a['skipped']) or '–'} |")
    emb = s["embedding"]
    lines += [
        "",
        "Scores in %: hit@1 for image and video tasks, NDCG@5 with linear gain for visual documents "
        "(VLM2Vec's metrics); averages are means over the scored tasks. Ties rank the earlier candidate "
        "first (the row's order, positive first, for local tasks).",
        "",
        f"- embedding: {emb['embedding']}",
        f"- checkpoint: {s['checkpoint']}" + (f" (step {s['step']})" if s.get("step") else ""),
        f"- data: {s['data_root']}" + (f"; first {s['max_queries']} queries per task" if s.get("max_queries") else ""),
    ]
    Path(paths["md"]).write_text("\n".join(lines) + "\n")
    return paths
