"""End-to-end evaluation: checkpoint -> embeddings (cached) -> exact top-k -> Recall@K / MRR -> reports.
(``eval.benchmark=mmeb``: MMEB-V2 scoring and reports of :mod:`elva_jax.eval.mmeb`.)

``evaluate(cfg, ...)`` is what ``python -m elva_jax.eval`` and the end of a training run call. The
config is a training preset (``configs/*.yaml``: model, data, mesh ... sections) plus an ``eval``
section (:class:`EvalSection`), so ``eval.mode=ret`` or ``data.root=/data/M-BEIR`` are overrides.
``eval.mode=instruct_last`` embeds the Qwen3-VL-Embedding way (query instruction as the system turn,
``data.default_instruction`` for candidates; :mod:`elva_jax.eval.embed`).

Per task: queries (with deterministic instructions, see :mod:`elva_jax.eval.tasks`) and the pool
(local, or the union "global" pool) are embedded by :class:`elva_jax.eval.embed.Embedder` (cache under
``{cache_dir}/{fingerprint[:12]}/``; identical pools are embedded once per run); exact top-k with
k = max(eval.topk (50), K) (or the whole pool when smaller) by :func:`elva_jax.retrieval.topk.streaming_topk`;
Recall@K with the task's K, R@1/5/10/50 (a k above the pool size counts the whole pool) and MRR
truncated at k. Averages of R@K are per group (mbeir, bundled, mrbench, zeroshot) and over all tasks.

Grain masking (``eval.grain_masking``): for queries with annotated grain phrases, the cosine distance
1 - cos(e(q), e(q without one phrase)), averaged over a query's phrases, then over queries (MRBench
queries first when the run has them, at most ``eval.grain_max_queries``).

Outputs in the out directory: ``results.json`` (per task, averages, settings), ``results.md`` (one row
per task with R@K and the average, the paper's layout) and ``recall.png`` (R@K per task; before/after
bars with ``eval.compare_to``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from elva_jax import configlib
from elva_jax.data.pipeline import VIDEO_FIELDS
from elva_jax.data.tokenize import generation_vocab
from elva_jax.eval import tasks as T
from elva_jax.eval.embed import EmbedConfig, Embedder, records_digest
from elva_jax.retrieval.metrics import mrr_from_topk, recall_from_topk
from elva_jax.schema import EMBED_MODES, EvalSection, RunConfig, project

__all__ = ["EvalConfig", "EvalSection", "evaluate", "load_config", "resolve_checkpoint", "write_reports"]

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


EvalConfig = RunConfig  # a training preset's sections, `eval` among them


# EmbedConfig fields that the run's data section sets (the rest come from the eval section)
_FROM_DATA = (
    "seq_buckets",
    "patch_rows",
    "patch_row_len",
    "min_pixels",
    "max_pixels",
    "default_instruction",
) + VIDEO_FIELDS


def default_config_path() -> str | None:
    p = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    return str(p) if p.exists() else None


def load_config(cfg=None, overrides=()) -> EvalConfig:
    """EvalConfig from None (the tiny CPU preset), a YAML path, a dict, a RunConfig or an EvalConfig,
    with ``key.sub=value`` overrides applied on top."""
    overrides = list(overrides)
    if cfg is None or isinstance(cfg, str | os.PathLike):
        return configlib.load(EvalConfig, str(cfg) if cfg is not None else default_config_path(), overrides)
    if isinstance(cfg, RunConfig):
        data = configlib.to_dict(cfg)
    elif isinstance(cfg, dict):
        data = cfg
    else:
        raise TypeError(f"cannot build an EvalConfig from {type(cfg).__name__}")
    return configlib.from_dict(EvalConfig, configlib.apply_overrides(data, overrides))


# ----------------------------------------------------------------------------------------------------
# checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None, int | None]:
    """(transformers model dir, run dir or None, step or None) of a checkpoint dir or a run dir."""
    p = Path(path)
    if (p / "config.json").is_file():
        model_dir = p
    elif (p / "export" / "config.json").is_file():
        model_dir = p / "export"
    else:
        raise FileNotFoundError(
            f"{p}: neither a transformers checkpoint (config.json + *.safetensors) nor a run dir with export/"
        )
    run_dir = model_dir.parent if model_dir.name == "export" and (model_dir.parent / "config.yaml").is_file() else None
    step = None
    if run_dir is not None and (run_dir / "summary.json").is_file():
        try:
            s = json.loads((run_dir / "summary.json").read_text())
            step = s.get("end_step", s.get("steps"))
        except (OSError, ValueError):
            step = None
    return model_dir, run_dir, step


def resolve_mode(mode: str, model_dir: Path | None) -> tuple[str, str]:
    """(embedding mode, why) for ``eval.mode``: an explicit mode as given; "auto" from the checkpoint's export
    record (``elva_export.json``: "ret" after the RL stage, else the contrastive stage's embedding), "eol"
    without one."""
    if mode != "auto":
        return mode, "eval.mode / --mode"
    from elva_jax.model.hf_checkpoint import EXPORT_INFO, read_export_info

    info = read_export_info(model_dir) if model_dir is not None else None
    if not info:
        return "eol", f"auto: no {EXPORT_INFO} with the checkpoint, LamRA's EOL"
    emb = info.get("embedding")
    chosen = emb if emb in EMBED_MODES else "eol"
    return chosen, f"auto: {EXPORT_INFO} says trained by the {info.get('trained_by')} stage with {emb}"


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _identity(model_dir: Path, step: int | None) -> dict:
    """What names the weights in the cache fingerprint: their content (CRC-32 of every safetensors file,
    about 1 GB/s, so seconds for a 7B), not their path, size or modification time, which a swap of
    weights at the same path can keep."""
    weights = sorted(
        [f.name, f.stat().st_size, _file_crc(f)] for f in model_dir.iterdir() if f.suffix == ".safetensors"
    )
    return {"checkpoint": str(model_dir.resolve()), "step": step, "weights": weights}


def _load_model(cfg: EvalConfig, model_dir: Path):
    from elva_jax.data.tokenize import Tokenizer, has_tokenizer_files
    from elva_jax.model.hf_checkpoint import load_params, resize_vocab

    mcfg, params = load_params(str(model_dir), dtype=cfg.model.param_dtype)
    tok_dir = cfg.model.tokenizer or (str(model_dir) if has_tokenizer_files(model_dir) else None)
    tok = Tokenizer.from_dir(tok_dir, geometry=mcfg.vision.geometry)
    if tok.vocab_size > mcfg.text.vocab_size:
        params, mcfg = resize_vocab(params, mcfg, tok.vocab_size)
    return mcfg, params, tok


def _cot_generator(cfg: EvalConfig, opts, cache_policy: str, out: Path, mesh, log):
    """The T-CoT generator of ``eval.cot_reasoner`` (`elva_jax.eval.cot`); its cache under
    ``{cache_dir or out/cache}/cot/{fingerprint[:12]}`` (a temporary directory with ``cache=none``)."""
    from elva_jax.eval.cot import CoTGenerator, cot_config

    rdir, _, rstep = resolve_checkpoint(cfg.eval.cot_reasoner)
    rcfg, rparams, rtok = _load_model(cfg, rdir)
    root = None
    if cache_policy != "none":
        root = (Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else out / "cache") / "cot"
    gen = CoTGenerator(
        rparams, rcfg, rtok, cot_config(cfg), opts=opts, identity=_identity(rdir, rstep), cache_root=root, mesh=mesh,
        log=log,
    )  # fmt: skip
    log(f"[elva_jax.eval] T-CoTs by the reasoner {rdir} ({rcfg.text.num_layers}-layer); cache {gen.dir}")
    return gen


# ----------------------------------------------------------------------------------------------------
# tasks of a benchmark


def _bundled_root(cfg: EvalConfig, run_dir: Path | None) -> Path:
    e = cfg.eval
    if e.data_root:
        return Path(e.data_root)
    if cfg.data.kind == "bundled" and cfg.data.root:
        return Path(cfg.data.root)
    if run_dir is not None and (run_dir / "bundled_data" / "meta" / "summary.json").is_file():
        return run_dir / "bundled_data"
    from elva_jax.data.multigrain import ensure_generated

    d = cfg.data
    return ensure_generated(
        Path(cfg.run.dir) / "bundled_data", n_train=d.bundled_train_scenes, n_test=d.bundled_test_scenes
    )


def _mmeb_root(cfg: EvalConfig, run_dir: Path | None) -> Path:
    """--data / eval.data_root, else the run's bundled MMEB-format set (generated when absent)."""
    if cfg.eval.data_root:
        return Path(cfg.eval.data_root)
    for root in ([run_dir / "mmeb_bundled"] if run_dir is not None else []) + [Path(cfg.run.dir) / "mmeb_bundled"]:
        if (root / "mmeb_tasks.json").is_file():
            return root
    from elva_jax.data.mmeb_bundled import generate

    root = Path(cfg.run.dir) / "mmeb_bundled"
    generate(root, seed=0, overwrite=True)
    return root


def benchmark_tasks(cfg: EvalConfig, run_dir: Path | None = None) -> tuple[list[T.TaskSpec], Path | None]:
    """(task specs, data root) of ``cfg.eval.benchmark`` filtered by ``eval.tasks``."""
    e = cfg.eval
    root: Path | None
    if e.benchmark == "bundled":
        root = _bundled_root(cfg, run_dir)
        specs = T.bundled_tasks(root)
    elif e.benchmark == "mbeir":
        root = Path(e.data_root or cfg.data.root) if (e.data_root or cfg.data.root) else None
        if root is None or not root.is_dir():
            raise T.EvalDataError(f"M-BEIR root {root} not found: set data.root=... or eval.data_root=...")
        specs = T.mbeir_tasks(root)
    elif e.benchmark == "mrbench":
        if e.data_root or cfg.data.root:
            root = Path(e.data_root or cfg.data.root)
        else:
            root = _bundled_root(cfg, run_dir)
        mdir = Path(e.mrbench_dir) if e.mrbench_dir else root / "mrbench"
        specs = T.mrbench_tasks(mdir, Path(e.image_root) if e.image_root else root)
    else:
        root = Path(e.data_root or cfg.data.root) if (e.data_root or cfg.data.root) else None
        if not e.zeroshot_tasks:
            raise T.EvalDataError("benchmark zeroshot needs eval.zeroshot_tasks (or --task name:query:pool:qrels[:K])")
        specs = [T.parse_task_arg(a, root) for a in e.zeroshot_tasks]
    return T.select_tasks(specs, e.tasks), root


# ----------------------------------------------------------------------------------------------------
# evaluation


def _grain_masking(cfg, loaded, qrecs, embedder, emb_kw, grains_path: Path, log) -> dict:
    e = cfg.eval
    grains = T.read_grains(grains_path)
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
    if e.grain_max_queries > 0:
        chosen = chosen[: e.grain_max_queries]
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


def evaluate(
    cfg=None,
    *,
    overrides=(),
    checkpoint: str | None = None,
    params: dict | None = None,
    model_cfg=None,
    tokenizer=None,
    identity: dict | None = None,
    log=None,
) -> dict:
    """Run one evaluation and write results.json / results.md / recall.png; returns the results dict.

    cfg: EvalConfig, RunConfig (a training run's), dict, YAML path or None (tiny CPU preset); overrides
    ``key.sub=value`` apply on top. checkpoint: a transformers dir or a run dir (its ``export/``; default
    ``model.checkpoint``). In-memory ``params`` + ``model_cfg`` + ``tokenizer`` skip loading; then
    ``identity`` (e.g. ``{"run": dir, "step": n}``) names them for the cache (no identity: no cache).
    """
    import jax

    from elva_jax.model.config import ModelOptions
    from elva_jax.retrieval.topk import streaming_topk

    t_start = time.perf_counter()
    cfg = load_config(cfg, overrides)
    e = cfg.eval
    log = log or (lambda s: print(s, flush=True))
    ckpt = checkpoint or cfg.model.checkpoint
    run_dir, step = None, None
    cache_policy = e.cache
    if params is None:
        if not ckpt:
            raise configlib.ConfigError("no checkpoint: pass --checkpoint DIR_OR_RUN (or model.checkpoint=...)")
        model_dir, run_dir, step = resolve_checkpoint(ckpt)
        ckpt_str = str(model_dir)
    elif model_cfg is None or tokenizer is None:
        raise ValueError("in-memory params need model_cfg and tokenizer")
    else:
        ckpt_str = str(ckpt or "<in-memory>")
    if e.cot_reasoner:  # Embed-RL's embedder layout: the side + its T-CoT, hidden state at <emb>
        resolve_checkpoint(e.cot_reasoner)  # a wrong reasoner path fails before any model loads
        mode, mode_source = "eol", "--cot: Embed-RL's embedder layout (side + T-CoT + summarise request, <emb>)"
        if e.mode not in ("auto", "eol"):
            log(f"[elva_jax.eval] --mode {e.mode} is not used with --cot")
    else:
        mode, mode_source = resolve_mode(e.mode, None if params is not None else model_dir)
    if mode != e.mode:
        e = dataclasses.replace(e, mode=mode)
        cfg = dataclasses.replace(cfg, eval=e)
    mode_name = "tcot" if e.cot_reasoner else mode
    log(f"[elva_jax.eval] embedding mode {mode_name} ({mode_source})")
    base = run_dir if run_dir is not None else Path(cfg.run.dir)
    out = Path(e.out) if e.out else base / "eval" / f"{e.benchmark}-{mode_name}-{e.pool}"
    # read and validate every task first: data errors surface before the model loads
    if e.benchmark == "mmeb":
        from elva_jax.eval import mmeb as M

        if e.compare_to:
            raise T.EvalDataError("--compare-to is not available with --benchmark mmeb")
        if e.grain_masking:  # on in the tiny preset; MMEB has no grain annotations
            log("[elva_jax.eval] grain masking does not apply to MMEB: not run")
        root = _mmeb_root(cfg, run_dir)
        mtasks = M.load_tasks(root, e.tasks, materialize_dir=out / "mmeb_images", max_queries=e.max_queries)
        specs, loaded = [], []
    else:
        specs, root = benchmark_tasks(cfg, run_dir)
        pool_cache: dict = {}
        loaded = [T.load_task(s, pool=e.pool, max_queries=e.max_queries, pool_cache=pool_cache) for s in specs]
    if e.compare_to and not Path(e.compare_to).is_file():
        raise FileNotFoundError(f"--compare-to {e.compare_to}: file not found")
    if params is None:
        model_cfg, params, tok = _load_model(cfg, model_dir)
        identity = _identity(model_dir, step)
    else:
        tok = tokenizer
        if identity is None:
            cache_policy = "none"
            log("[elva_jax.eval] in-memory params without an identity: embedding cache disabled (eval.cache=none)")
    writer = jax.process_index() == 0  # multi-process: every process evaluates, process 0 writes files
    if not writer:
        cache_policy = "none"
    if writer:
        out.mkdir(parents=True, exist_ok=True)

    m = cfg.model
    opts = ModelOptions(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        position_mode=m.position_mode,
        vocab=generation_vocab(tok, m.generation_words),  # what [RET] summaries may use
    )
    # the eval section's embedding fields, and the data section's shapes, pixel limits and instruction
    tcot = cfg.embed_rl.summarise_instruction if e.cot_reasoner else ""
    ecfg = project(EmbedConfig, e, **{k: getattr(cfg.data, k) for k in _FROM_DATA}, tcot_request=tcot)
    mesh = None
    if jax.local_device_count() > 1:
        from elva_jax.parallel.sharding import make_mesh

        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
    cot = None
    if e.cot_reasoner:
        cot = _cot_generator(cfg, opts, cache_policy, out, mesh, log)
    embedder = Embedder(params, model_cfg, tok, ecfg, opts=opts, identity=identity, mesh=mesh, log=log, cot=cot)
    fp = embedder.fingerprint_sha
    cache_root = (Path(e.cache_dir) if e.cache_dir else out / "cache") / fp[:12]
    emb_kw = {"cache_dir": None if cache_policy == "none" else cache_root, "cache": cache_policy}
    rule = T.InstructionRule(e.instructions, e.instruction_seed, e.instruction_index)
    settings = {
        "benchmark": e.benchmark,
        "mode": mode_name,
        "mode_source": mode_source,
        "embedding": ecfg.describe(),
        "pool": e.pool,
        "instruction_rule": rule.describe(),
        "checkpoint": ckpt_str,
        "run_dir": str(run_dir) if run_dir else None,
        "step": step,
        "data_root": str(root) if root else None,
        "recall_ks": list(e.recall_ks),
        "topk": e.topk,
        "tie_order": e.tie_order,
        "max_queries": e.max_queries,
        "dtype": cfg.model.dtype,
        "position_mode": cfg.model.position_mode,
        "devices": jax.local_device_count(),
        "fingerprint_sha": fp,
        "cache_dir": str(cache_root) if cache_policy != "none" else None,
    }
    if cot is not None:
        settings["cot"] = {"reasoner": e.cot_reasoner, "cache_dir": str(cot.dir), **cot.describe()}
    if e.benchmark == "mmeb":
        results = M.evaluate_tasks(mtasks, embedder, emb_kw, log=log)
        results = {"settings": settings, **results}
        if cot is not None:
            results["cot"] = cot.summary()
        results["settings"]["instruction_rule"] = "MMEB: each record's own instruction (qry_inst / tgt_inst)"
        results["timing"]["total_s"] = time.perf_counter() - t_start
        results["files"] = M.write_reports(results, out) if writer else {}
        a = results["averages"]["all"]
        log(f"[elva_jax.eval] MMEB overall {_pct(a['score'])} over {a['n_tasks']} scored tasks; {out}")
        return results

    instr_cache: dict = {}
    pool_embs: dict = {}
    per_task: dict[str, dict] = {}
    qrecs_all = []
    t_embed = t_topk = 0.0
    for lt in loaded:
        s = lt.spec
        ins = None
        if rule.enabled and s.instructions_file is not None:
            key = str(s.instructions_file)
            if key not in instr_cache:
                from elva_jax.data.mbeir import read_instructions

                instr_cache[key] = read_instructions(s.instructions_file)
            ins = instr_cache[key]
        qrecs, instr_summary = T.query_records(lt, ins, rule)
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
        recall = {str(k): recall_from_topk(idx, lt.relevant, min(k, k_eff)) for k in e.recall_ks}
        per_task[s.name] = {
            "group": s.group,
            "task_id": lt.queries[0].task_id,
            "modality": MODALITY.get(lt.queries[0].task_id, "?"),
            "k": s.k,
            "recall_at_k": recall_from_topk(idx, lt.relevant, min(s.k, k_eff)),
            "recall": recall,
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
        if n_c < max(max(e.recall_ks), s.k):
            per_task[s.name]["note"] = f"pool of {n_c} < k: R@k for k > {n_c} ranks the whole pool"
        r = per_task[s.name]
        log(f"[elva_jax.eval] {s.name}: R@{s.k} {100 * r['recall_at_k']:.1f} ({r['n_queries']} q, {n_c} cands)")

    groups: dict[str, list[float]] = {}
    for r in per_task.values():
        groups.setdefault(r["group"], []).append(r["recall_at_k"])
    averages = {g: {"recall_at_k": float(np.mean(v)), "n_tasks": len(v)} for g, v in groups.items()}
    averages["all"] = {
        "recall_at_k": float(np.mean([r["recall_at_k"] for r in per_task.values()])),
        "n_tasks": len(per_task),
    }

    results: dict[str, Any] = {
        "settings": settings,
        "tasks": per_task,
        "averages": averages,
    }
    if e.grain_masking:
        gpath = Path(e.grains_file) if e.grains_file else None
        if gpath is None:
            if (
                e.benchmark in ("bundled", "mrbench")
                and root is not None
                and (root / "meta/query_grains.jsonl").is_file()
            ):
                gpath = root / "meta" / "query_grains.jsonl"
            else:
                raise T.EvalDataError("grain masking needs eval.grains_file (a jsonl of {qid, phrases})")
        t0 = time.perf_counter()
        results["grain_masking"] = _grain_masking(cfg, loaded, qrecs_all, embedder, emb_kw, gpath, log)
        t_embed += time.perf_counter() - t0
    results["embedding"] = embedder.stats
    if cot is not None:
        results["cot"] = cot.summary()
    results["timing"] = {"embed_s": t_embed, "topk_s": t_topk, "total_s": time.perf_counter() - t_start}
    before = None
    if e.compare_to:
        cp = Path(e.compare_to)
        if not cp.is_file():
            raise FileNotFoundError(f"--compare-to {cp}: file not found")
        try:
            before = json.loads(cp.read_text())
            assert isinstance(before.get("tasks"), dict)
        except (ValueError, AssertionError):
            raise T.EvalDataError(f"--compare-to {cp}: not a results.json of elva_jax.eval") from None
        results["compare_to"] = str(cp)
    results["files"] = write_reports(results, out, before) if writer else {}
    log(
        f"[elva_jax.eval] average R@K {100 * averages['all']['recall_at_k']:.1f} over {len(per_task)} tasks "
        f"({mode_name} embedding, {mode_source}); {out}"
    )
    return results


# ----------------------------------------------------------------------------------------------------
# reports


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def write_reports(results: dict, out: str | Path, before: dict | None = None) -> dict:
    """Write results.json, results.md and recall.png into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "md": str(out / "results.md"), "png": str(out / "recall.png")}
    results = {**results, "files": paths}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    Path(paths["md"]).write_text(_markdown(results, before))
    _bar_chart(results, before, Path(paths["png"]))
    return paths


def _markdown(results: dict, before: dict | None) -> str:
    s = results["settings"]
    ks = s["recall_ks"]
    bt = (before or {}).get("tasks", {})
    head = ["Task", "Modality", "K"] + (["R@K before", "R@K", "Δ"] if before else ["R@K"])
    head += [f"R@{k}" for k in ks] + ["MRR", "Queries", "Candidates"]
    lines = [
        f"# Retrieval results: {s['benchmark']} ({s['mode']} embedding, {s['pool']} pool)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for name, r in results["tasks"].items():
        row = [name, r["modality"], str(r["k"])]
        if before:
            b = bt.get(name, {}).get("recall_at_k")
            delta = "–" if b is None else f"{100 * (r['recall_at_k'] - b):+.1f}"
            row += [_pct(b), _pct(r["recall_at_k"]), delta]
        else:
            row.append(_pct(r["recall_at_k"]))
        row += [_pct(r["recall"][str(k)]) for k in ks]
        row += [f"{r['mrr']:.3f}", str(r["n_queries"]), str(r["n_candidates"])]
        lines.append("| " + " | ".join(row) + " |")
    for g, a in results["averages"].items():
        label = "**Average**" if g == "all" else f"**Average ({g})**"
        row = [label, "", ""]
        if before:
            b = (before.get("averages", {}).get(g) or {}).get("recall_at_k")
            delta = "–" if b is None else f"{100 * (a['recall_at_k'] - b):+.1f}"
            row += [_pct(b), f"**{_pct(a['recall_at_k'])}**", delta]
        else:
            row.append(f"**{_pct(a['recall_at_k'])}**")
        row += [""] * (len(ks) + 3)
        lines.append("| " + " | ".join(row) + " |")
    emb = s["embedding"]
    lines += [
        "",
        "Recall@K in %, K per task (UniIR: a query is a hit if any qrels positive is in its top K); "
        f"MRR truncated at the top-{s['topk']} (or the whole pool when smaller).",
        "",
        f"- mode: {s['mode']} ({s.get('mode_source', 'eval.mode')})",
        f"- embedding: {emb['embedding']}" + (f"; summary {json.dumps(emb['summary'])}" if "summary" in emb else ""),
        f"- instructions: {s['instruction_rule']}",
        f"- ties: {s.get('tie_order', 'index')} order"
        + (" (faiss IndexFlatIP's, as UniIR)" if s.get("tie_order") == "faiss" else " (lower candidate index first)"),
        f"- pool: {s['pool']}; checkpoint: {s['checkpoint']}" + (f" (step {s['step']})" if s.get("step") else ""),
        f"- dtype {s['dtype']}, positions {s['position_mode']}, max length {emb['max_length']}"
        + (f", first {s['max_queries']} queries per task" if s.get("max_queries") else ""),
    ]
    if before:
        lines.append(f"- before: {results.get('compare_to', '')}")
    gm = results.get("grain_masking")
    if gm:
        lines += [
            "",
            "## Grain masking",
            "",
            f"Mean cosine distance between a query's embedding and the embedding with one grain phrase removed: "
            f"**{gm['mean_cosine_distance']:.4f}** ({gm['n_queries']} queries, {gm['n_phrases']} phrases, "
            f"{gm['queries_from']}).",
            "",
            "| Grain kind | Mean distance |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in gm["by_kind"].items()]
    return "\n".join(lines) + "\n"


def _bar_chart(results: dict, before: dict | None, path: Path) -> None:
    """R@K per task (and the average) as a PNG bar chart drawn with PIL; grey = before, blue = now."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(results["tasks"]) + ["average"]
    now = [results["tasks"][n]["recall_at_k"] for n in names[:-1]] + [results["averages"]["all"]["recall_at_k"]]
    prev = None
    if before:
        bt = before.get("tasks", {})
        prev = [bt.get(n, {}).get("recall_at_k") for n in names[:-1]]
        prev.append((before.get("averages", {}).get("all") or {}).get("recall_at_k"))
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    group_w = 56 if prev else 40
    text_w = int(max(small.getlength(n) for n in names)) + 8
    slant = int(text_w * 0.71) + 16  # extent of a label rotated by 45 degrees
    left, right, top, bottom = max(60, slant - group_w // 2 + 10), 20, 50, slant + 20
    plot_h = 300
    W = left + right + group_w * len(names)
    H = top + plot_h + bottom
    img = Image.new("RGB", (max(W, 360), H), "white")
    d = ImageDraw.Draw(img)
    s = results["settings"]
    d.text((left, 12), f"Recall@K (%) - {s['benchmark']}, {s['mode']}, {s['pool']} pool", fill="black", font=font)
    y0 = top + plot_h
    for v in range(0, 101, 20):
        y = y0 - plot_h * v / 100
        d.line([(left, y), (left + group_w * len(names), y)], fill=(225, 225, 225))
        d.text((left - 8, y), str(v), fill="black", font=small, anchor="rm")
    d.line([(left, top), (left, y0)], fill="black")
    d.line([(left, y0), (left + group_w * len(names), y0)], fill="black")
    blue, grey = (52, 101, 164), (170, 170, 170)
    for i, n in enumerate(names):
        x = left + i * group_w + 6
        bars = [(prev[i], grey), (now[i], blue)] if prev else [(now[i], blue)]
        bw = (group_w - 12) // len(bars)
        for j, (v, colour) in enumerate(bars):
            if v is None:
                continue
            h = plot_h * max(0.0, min(1.0, v))
            bx = x + j * bw
            d.rectangle([bx, y0 - h, bx + bw - 2, y0], fill=colour)
            d.text((bx + bw / 2 - 1, y0 - h - 2), f"{100 * v:.0f}", fill="black", font=small, anchor="mb")
        label = Image.new("RGBA", (text_w, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((text_w - 2, 8), n, fill="black", font=small, anchor="rm")
        label = label.rotate(45, expand=True, resample=Image.Resampling.BICUBIC)
        img.paste(label, (int(x + group_w / 2 - label.width + 6), y0 + 2), label)
    if prev:
        lx = max(W, 360) - 150
        d.rectangle([lx, 14, lx + 10, 24], fill=grey)
        d.text((lx + 14, 19), "before", fill="black", font=small, anchor="lm")
        d.rectangle([lx + 70, 14, lx + 80, 24], fill=blue)
        d.text((lx + 84, 19), "after", fill="black", font=small, anchor="lm")
    img.save(path)
