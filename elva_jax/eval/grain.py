"""Grain masking (``eval.grain_masking``): how far a query's embedding moves when one of its annotated grain
phrases is removed.

For queries with annotated grain phrases, the cosine distance 1 - cos(e(q), e(q without one phrase)),
averaged over a query's phrases, then over queries (MRBench queries first when the run has them, at most
``eval.grain_max_queries``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from elva_jax.eval import tasks as T
from elva_jax.eval.embed_cache import records_digest

__all__ = ["grain_masking", "grains_file"]


def grains_file(e, root: Path | None) -> Path:
    """The grain annotations of an evaluation: ``eval.grains_file``, else the bundled or MRBench data's
    ``meta/query_grains.jsonl``; ``e`` is the eval section."""
    if e.grains_file:
        return Path(e.grains_file)
    if e.benchmark in ("bundled", "mrbench") and root is not None and (root / "meta/query_grains.jsonl").is_file():
        return root / "meta" / "query_grains.jsonl"
    raise T.EvalDataError("grain masking needs eval.grains_file (a jsonl of {qid, phrases})")


def _chosen_queries(loaded, qrecs, grains: dict, max_queries: int) -> tuple[list, bool]:
    """([(query, its record)] whose text holds one of its grain phrases, whether they come from MRBench
    tasks): the MRBench tasks' when there are any, else every task's; one per qid, the first
    ``max_queries`` (> 0)."""
    picks: dict[bool, list] = {True: [], False: []}  # from MRBench tasks / from any task
    seen: set[str] = set()
    for lt, recs in zip(loaded, qrecs):
        for q, rec in zip(lt.queries, recs):
            if q.query_txt and q.qid in grains and any(T.mask_phrase(q.query_txt, g) for g in grains[q.qid]):
                if lt.spec.group == "mrbench":
                    picks[True].append((q, rec))
                if q.qid not in seen:
                    seen.add(q.qid)
                    picks[False].append((q, rec))
    from_mrbench = bool(picks[True])
    chosen = list({q.qid: (q, rec) for q, rec in picks[from_mrbench]}.values())
    if max_queries > 0:
        chosen = chosen[:max_queries]
    return chosen, from_mrbench


def _masked_records(chosen: list, grains: dict) -> tuple[list, list, list, list, int]:
    """(original records, masked records, the original each masked one comes from, the phrase kinds, phrases
    not found in their query's text) of the chosen queries: one masked record per phrase."""
    origs, masked, owner, kinds, not_found = [], [], [], [], 0
    for qi, (q, rec) in enumerate(chosen):
        origs.append(rec)
        for j, g in enumerate(grains[q.qid]):
            text = T.mask_phrase(q.query_txt, g)
            if text is None:
                not_found += 1
                continue
            masked.append({"id": f"{q.qid}#mask{j}", "item": {**rec["item"], "text": text}})
            owner.append(qi)
            kinds.append(g.get("kind") or "phrase")
    return origs, masked, owner, kinds, not_found


def grain_masking(cfg, loaded, qrecs, embedder, emb_kw, grains_path: Path, log) -> dict:
    """The grain-masking summary of results.json: mean cosine distance (over queries, over phrases, per
    phrase kind) between the embeddings of the queries (``loaded`` tasks, their records ``qrecs``) and
    of the queries with one phrase removed."""
    grains = T.read_grains(grains_path)
    chosen, from_mrbench = _chosen_queries(loaded, qrecs, grains, cfg.eval.grain_max_queries)
    origs, masked, owner, kinds, not_found = _masked_records(chosen, grains)
    if not masked:
        raise T.EvalDataError(f"grain masking: no query of this run has a grain phrase in its text ({grains_path})")
    eo = np.asarray(embedder.embed(origs, name=f"grain.orig.{records_digest(origs)[:10]}", **emb_kw))
    em = np.asarray(embedder.embed(masked, name=f"grain.masked.{records_digest(masked)[:10]}", **emb_kw))
    owner_a = np.asarray(owner)
    cos = np.sum(eo[owner_a] * em, axis=1) / (np.linalg.norm(eo[owner_a], axis=1) * np.linalg.norm(em, axis=1) + 1e-12)
    dist = 1.0 - np.clip(cos, -1.0, 1.0)
    per_query = [float(dist[owner_a == qi].mean()) for qi in sorted(set(owner))]
    by_kind = {k: float(dist[np.asarray(kinds) == k].mean()) for k in sorted(set(kinds))}
    out = {
        "mean_cosine_distance": float(np.mean(per_query)),
        "mean_over_phrases": float(dist.mean()),
        "by_kind": by_kind,
        "n_queries": len(per_query),
        "n_phrases": int(len(dist)),
        "phrases_not_found": not_found,
        "queries_from": "mrbench tasks" if from_mrbench else "all evaluated tasks",
        "annotations": str(grains_path),
        "definition": "mean over queries of the mean over its phrases of 1 - cos(e(q), e(q with the phrase removed))",
    }
    log(f"[elva_jax.eval] grain masking: {out['mean_cosine_distance']:.4f} over {out['n_queries']} queries")
    return out
