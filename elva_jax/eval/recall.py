"""Recall@K and MRR of the retrieval benchmarks (bundled, mbeir, mrbench, zeroshot: the M-BEIR layout).

Per task: queries (with deterministic instructions, see :mod:`elva_jax.eval.tasks`) and the pool (local,
or the union "global" pool) are embedded (identical pools once per run); exact top-k with k = max(eval.topk,
K) (or the whole pool when smaller) by :func:`elva_jax.retrieval.topk.streaming_topk`; Recall@K with the
task's K, R@1/5/10/50 (a k above the pool size counts the whole pool) and MRR truncated at k. Averages of
R@K are per group (mbeir, bundled, mrbench, zeroshot) and over all tasks.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from elva_jax.data.benchmarks.mbeir import read_instructions
from elva_jax.eval import tasks as T
from elva_jax.eval.embed_cache import records_digest
from elva_jax.retrieval.metrics import mrr_from_topk, recall_from_topk
from elva_jax.retrieval.topk import streaming_topk

__all__ = ["MODALITY", "TaskScores", "averages", "score_tasks"]

MODALITY = {
    0: "t→i",
    1: "t→t",
    2: "t→(i,t)",
    3: "i→t",
    4: "i→i",
    5: "i→(i,t)",
    6: "(i,t)→t",
    7: "(i,t)→i",
    8: "(i,t)→(i,t)",
}


class TaskScores(NamedTuple):
    """What :func:`score_tasks` returns: results.json's "tasks" (by name), each task's query records (the
    grain-masking analysis embeds them again), and the seconds spent embedding and in the top-k."""

    tasks: dict[str, dict]
    query_records: list[list[dict]]
    embed_s: float
    topk_s: float


def _task_instructions(spec: T.TaskSpec, rule: T.InstructionRule, cache: dict):
    """The instruction table of a task's queries (read once per file), or None when the rule adds none."""
    if not (rule.enabled and spec.instructions_file is not None):
        return None
    key = str(spec.instructions_file)
    if key not in cache:
        cache[key] = read_instructions(spec.instructions_file)
    return cache[key]


def _task_result(lt: T.LoadedTask, idx, k_eff: int, recall_ks, instr_summary) -> dict:
    """results.json's entry of one task from its queries' top-``k_eff`` candidate indices ``idx``."""
    s = lt.spec
    n_c = len(lt.pool)
    r = {
        "group": s.group,
        "task_id": lt.queries[0].task_id,
        "modality": MODALITY.get(lt.queries[0].task_id, "?"),
        "k": s.k,
        "recall_at_k": recall_from_topk(idx, lt.relevant, min(s.k, k_eff)),
        "recall": {str(k): recall_from_topk(idx, lt.relevant, min(k, k_eff)) for k in recall_ks},
        "mrr": mrr_from_topk(idx, lt.relevant),
        "mrr_cutoff": k_eff,
        "n_queries": len(lt.queries),
        "n_candidates": n_c,
        "pool_file": str(lt.pool_file),
        "query_file": str(s.query_file),
        "qrels_file": str(s.qrels_file),
        "qrels_without_query": lt.qrels_without_query,
        "instructions": instr_summary,
    }
    if n_c < max(max(recall_ks), s.k):
        r["note"] = f"pool of {n_c} < k: R@k for k > {n_c} ranks the whole pool"
    return r


def score_tasks(
    loaded: list[T.LoadedTask], embedder, emb_kw: dict, rule: T.InstructionRule, e, mesh, log
) -> TaskScores:
    """Embed (cached under ``emb_kw``) and score every loaded task; ``e`` is the eval section (recall_ks,
    topk, chunk_size, tie_order). A pool shared by several tasks (same records) is embedded once."""
    instr_cache: dict = {}
    pool_embs: dict = {}
    per_task: dict[str, dict] = {}
    qrecs_all = []
    t_embed = t_topk = 0.0
    for lt in loaded:
        s = lt.spec
        qrecs, instr_summary = T.query_records(lt, _task_instructions(s, rule, instr_cache), rule)
        qrecs_all.append(qrecs)
        t0 = time.perf_counter()
        crecs = T.candidate_records(lt)
        pkey = records_digest(crecs)  # identical pools (same records) are embedded once
        if pkey not in pool_embs:
            pool_embs[pkey] = embedder.embed(crecs, name=f"pool.{lt.pool_file.stem}.{pkey[:10]}", **emb_kw)
        c_emb = pool_embs[pkey]
        q_emb = np.asarray(embedder.embed(qrecs, name=f"queries.{s.name}.{records_digest(qrecs)[:10]}", **emb_kw))
        t_embed += time.perf_counter() - t0
        n_c = len(lt.pool)
        k_eff = min(max(e.topk, s.k), n_c)
        t0 = time.perf_counter()
        _, idx = streaming_topk(q_emb, c_emb, k_eff, chunk_size=e.chunk_size, mesh=mesh, tie_order=e.tie_order)
        t_topk += time.perf_counter() - t0
        r = per_task[s.name] = _task_result(lt, idx, k_eff, e.recall_ks, instr_summary)
        log(f"[elva_jax.eval] {s.name}: R@{s.k} {100 * r['recall_at_k']:.1f} ({r['n_queries']} q, {n_c} cands)")
    return TaskScores(per_task, qrecs_all, t_embed, t_topk)


def averages(per_task: dict[str, dict]) -> dict[str, dict]:
    """results.json's "averages": the mean R@K of each group's tasks, and of all tasks ("all")."""
    groups: dict[str, list[float]] = {}
    for r in per_task.values():
        groups.setdefault(r["group"], []).append(r["recall_at_k"])
    out = {g: {"recall_at_k": float(np.mean(v)), "n_tasks": len(v)} for g, v in groups.items()}
    out["all"] = {
        "recall_at_k": float(np.mean([r["recall_at_k"] for r in per_task.values()])),
        "n_tasks": len(per_task),
    }
    return out
