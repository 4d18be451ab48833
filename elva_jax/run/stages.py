"""Assemble a run from its config: data, model, tokenizer, pipeline, training loop, export.

`python -m elva_jax.train [--config FILE] [key=value ...]`; with no arguments the tiny CPU preset
runs on the bundled multi-grain dataset (generated into the run directory on first use).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import numpy as np
import yaml

from elva_jax import configlib
from elva_jax.parallel.sharding import host_copy
from elva_jax.runtime.observe import MetricsLogger
from elva_jax.schema import RunConfig, check_recipe_available, project

BUNDLED_TRAIN = "query/train/mbeir_multigrain_union_train.jsonl"
BUNDLED_POOL = "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"


def default_config_path() -> str | None:
    p = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "tiny_cpu.yaml"
    )
    return p if os.path.exists(p) else None


def maybe_init_distributed() -> None:
    """Multi-host init: ELVA_DISTRIBUTED=1 (TPU pods: JAX finds the topology), SLURM with > 1 task, or an
    explicit coordinator (JAX_COORDINATOR_ADDRESS or ELVA_COORDINATOR_ADDRESS, ELVA_NUM_PROCESSES,
    ELVA_PROCESS_ID). Single-process runs skip it."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("ELVA_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ["ELVA_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["ELVA_NUM_PROCESSES"]),
            process_id=int(os.environ["ELVA_PROCESS_ID"]),
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("ELVA_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # auto-detects SLURM and Cloud TPU pod settings


def params_digest(params) -> str:
    """CRC-32 over every parameter's bytes (the mining cache's key: a re-trained model never reuses it)."""
    import zlib

    crc = 0
    for x in jax.tree.leaves(params):
        if getattr(x, "is_fully_addressable", True):
            crc = zlib.crc32(np.ascontiguousarray(jax.device_get(x)).view(np.uint8).tobytes(), crc)
        else:  # spread over hosts: hosts hold different shards, so only what they share (shape, dtype)
            crc = zlib.crc32(f"{x.shape}{x.dtype}".encode(), crc)
    return f"{crc:08x}"


def bundled_root(cfg: RunConfig) -> str:
    root = cfg.data.root or os.path.join(cfg.run.dir, "bundled_data")
    if jax.process_index() == 0:
        from elva_jax.data.multigrain import ensure_generated

        d = cfg.data  # a user-named directory: say what happens there (a foreign one is refused)
        ensure_generated(
            root, n_train=d.bundled_train_scenes, n_test=d.bundled_test_scenes, announce=bool(cfg.data.root)
        )
    if jax.process_count() > 1:  # every process meets here; the others then read what process 0 wrote
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("elva_jax bundled data")
    return root


def load_model(cfg: RunConfig):
    """(model config, params) from a checkpoint directory or a random preset."""
    from elva_jax.model.hf_checkpoint import load_params
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config

    if cfg.model.checkpoint:
        return load_params(cfg.model.checkpoint, dtype=cfg.model.param_dtype)
    mcfg = preset_config(cfg.model.random_preset)
    return mcfg, init_params(mcfg, jax.random.key(cfg.train.seed), dtype=cfg.model.param_dtype)


def training_files(cfg: RunConfig, root: str) -> tuple[tuple[str, ...], str]:
    """(query files, pool file) of an M-BEIR-format root, relative to it; with ``data.source=files`` a
    missing root or file is a config error naming the field and the path (local or gs://)."""
    from etils import epath

    d = cfg.data
    files = d.train_files or ((BUNDLED_TRAIN,) if d.kind == "bundled" else ())
    pool_file = d.pool_file or (BUNDLED_POOL if d.kind == "bundled" else "")
    if not files or not pool_file:
        raise configlib.ConfigError("data.train_files and data.pool_file are needed for kind=mbeir")
    if d.source == "files":
        for name, rel in [*(("data.train_files", f) for f in files), ("data.pool_file", pool_file)]:
            if not (epath.Path(root) / rel).is_file():
                where = "no such file" if epath.Path(root).is_dir() else "data.root does not exist"
                raise configlib.ConfigError(f"{name}: {epath.Path(root) / rel}: {where} (data.root {root!r})")
    return files, pool_file


def _policy_drops(cfg: RunConfig) -> list[str] | None:
    """Where records that cannot be built go: a list under the skip policy, None (raise) under fail."""
    return [] if cfg.data.image_policy == "skip" else None


def _report_drops(cfg: RunConfig, what: str, drops: list[str] | None, n_queries: int, out: list[str] | None) -> None:
    """Announce the records the skip policy left out, stop past ``data.max_skip_fraction``, and hand the
    reasons to ``out`` (the run's count for summary.json and metrics.jsonl)."""
    from elva_jax.data.pipeline import SkippedFractionError

    if not drops:
        return
    frac = len(drops) / max(1, n_queries)
    print(
        f"[elva_jax] {what}: skip policy left out {len(drops)} of {n_queries} queries that make no record "
        f"(first: {drops[0]})",
        flush=True,
    )
    if frac > cfg.data.max_skip_fraction:
        raise SkippedFractionError(
            f"{what}: {len(drops)}/{n_queries} queries make no record (> data.max_skip_fraction "
            f"{cfg.data.max_skip_fraction:.2%}); first: {drops[0]}"
        )
    if out is not None:
        out.extend(drops)


def build_records(cfg: RunConfig, root: str, dropped: list[str] | None = None):
    """The contrastive stage's records, read by index through the data source (``data.source``): an
    :class:`~elva_jax.data.sources.NLIRecords` or :class:`~elva_jax.data.sources.ContrastiveRecords`.

    A query that makes no record (no positive, a candidate missing from the pool) stops the run under
    ``data.image_policy=fail``; under ``skip`` it is left out, announced, counted against
    ``data.max_skip_fraction`` and its reason appended to ``dropped``."""
    from elva_jax.data.sources import ContrastiveRecords, NLIRecords, concat, open_source

    d = cfg.data
    src = open_source(root, d.source, cache_dir=os.path.join(cfg.run.dir, "source_cache"))
    if d.kind == "nli":
        return NLIRecords(src.nli(), num_negatives=d.hard_negatives)
    files, pool_file = training_files(cfg, root)
    queries = concat([src.queries(f) for f in files])
    drops = _policy_drops(cfg)
    recs = ContrastiveRecords(
        queries,
        src.pool(pool_file),
        src.image_root,
        instructions=src.instructions(d.instructions_file),
        num_negatives=d.hard_negatives,
        dropped=drops,
    )
    _report_drops(cfg, "contrastive data", drops, len(queries), dropped)
    return recs


def train_template(cfg: RunConfig) -> str:
    """The prompt template of the contrastive pipeline: "instruct_last" (Qwen3-VL-Embedding's prompt) for
    train.embedding=instruct_last, else LamRA's "eol" prompt (train.embedding eol or last)."""
    return "instruct_last" if cfg.train.embedding == "instruct_last" else "eol"


def train_encoder(cfg: RunConfig, tokenizer):
    """The contrastive pipeline's PromptEncoder (template from :func:`train_template`)."""
    from elva_jax.data.tokenize import PromptEncoder

    return PromptEncoder(tokenizer, train_template(cfg), default_instruction=cfg.data.default_instruction)


def build_rl_instances(
    cfg: RunConfig,
    root: str,
    *,
    params=None,
    mcfg=None,
    tokenizer=None,
    dropped: list[str] | None = None,
    stats_out: dict | None = None,
):
    """RL instances: query + positive + negatives, from the training queries, read by index through
    ``data.source`` (an :class:`~elva_jax.rl.loop.RLInstances` sequence; from prepared shards the sides
    carry the images' bytes).

    rl.negatives = "dataset": the first `num_hard_negatives` of each query's neg_cand_list plus
    `num_random_negatives` seeded random pool candidates. "mined" (the paper's balanced sampling):
    queries and pool are embedded with the current model (`rl.mining_embedding`: "eol", LamRA's EOL
    embedding, or "instruct_last", Qwen3-VL-Embedding's with `data.default_instruction` for the pool;
    cached under {run.dir}/rl/negatives), hard negatives are the nearest candidates below the
    false-negative cut (`rl.false_negative_filter`), random ones are drawn from the rest
    (`elva_jax.rl.negatives`; its stats, dropped false negatives per query among them, go to `stats_out`). Short lists
    (small pools) are filled by cycling, so every instance has the same number of candidates.
    """
    from elva_jax.data.sources import ContrastiveRecords, CorpusRecords, concat, open_source
    from elva_jax.rl.loop import RLInstances, select_instances

    d, r = cfg.data, cfg.rl
    if d.kind == "nli":
        raise configlib.ConfigError("the RL stage needs M-BEIR-format data (data.kind mbeir or bundled)")
    # read by index through the data source, as the contrastive stage reads (prepared shards carry the
    # images' bytes; nothing but the small id columns is read up front)
    src = open_source(root, d.source, cache_dir=os.path.join(cfg.run.dir, "source_cache"))
    files, pool_file = training_files(cfg, root)
    queries, pool = concat([src.queries(f) for f in files]), src.pool(pool_file)
    instructions = src.instructions(d.instructions_file)
    pool_items = CorpusRecords(pool, src.image_root)
    drops = _policy_drops(cfg)
    n_hard = r.num_hard_negatives if r.negatives == "dataset" else 0
    base = ContrastiveRecords(
        queries, pool, src.image_root, instructions=instructions, num_negatives=n_hard, dropped=drops
    )
    _report_drops(cfg, "RL instances", drops, len(queries), dropped)
    qids = queries.column("qid")
    ids = [{"id": qids[row], "index": i} for i, row in enumerate(base.query_rows)]
    selected = [x["index"] for x in select_instances(ids, r.query_fraction, cfg.train.seed)]
    if r.negatives == "dataset":
        return RLInstances(base, selected, pool_items, n_random=r.num_random_negatives, seed=cfg.train.seed)
    from elva_jax.eval.embed import EmbedConfig, Embedder
    from elva_jax.rl.negatives import mine_cached
    from elva_jax.train.loop import model_options

    pos_lists = queries.column("pos_cand_list")
    dids = pool.column("did")
    index = base.pool_index
    emb = Embedder(
        params,
        mcfg,
        tokenizer,
        EmbedConfig(
            mode=r.mining_embedding,
            seq_buckets=tuple(d.seq_buckets),
            patch_row_len=d.patch_row_len,
            default_instruction=d.default_instruction,
            min_pixels=d.min_pixels,
            max_pixels=d.max_pixels,
        ),
        opts=model_options(cfg),
        identity={"run": os.path.abspath(cfg.run.dir), "stage": "pre-rl", "params": params_digest(params)},
    )
    cache = os.path.join(cfg.run.dir, "rl", "negatives")
    # one cache entry per convention (the EOL names are the original ones, so existing caches stay valid)
    tag = "" if r.mining_embedding == "eol" else f".{r.mining_embedding}"
    chosen = [base[i] for i in selected]
    q_records = [{"id": b["id"], "item": b["query"]} for b in chosen]
    q_emb = np.asarray(emb.embed(q_records, name=f"queries{tag}", cache_dir=cache))
    # the Embedder holds its records in memory: a prepared pool's image bytes with them
    p_emb = np.asarray(emb.embed(pool_items, name=f"pool{tag}", cache_dir=cache))
    positives = [{index[x] for x in pos_lists[base.query_rows[i]] if x in index} for i in selected]
    del chosen, q_records
    negs, stats = mine_cached(
        os.path.join(cache, "negatives.json"),
        [ids[i]["id"] for i in selected],
        dids,
        q_emb,
        p_emb,
        positives,
        n_hard=r.num_hard_negatives,
        n_random=r.num_random_negatives,
        threshold=r.false_negative_threshold,
        seed=cfg.train.seed,
        filter_rule=r.false_negative_filter,
        margin=r.false_negative_margin,
    )
    stats = {k: v for k, v in stats.items() if k != "dropped_per_query"}  # per query: in negatives.json
    if stats_out is not None:
        stats_out.update(stats)
    print(
        f"[elva_jax] RL negatives: false negatives dropped per query mean {stats.get('dropped_mean', 0.0):.2f}, "
        f"max {stats.get('dropped_max')}, {stats.get('queries_with_drops')}/{stats.get('queries')} queries with "
        f"drops ({stats.get('filter')}); {stats}",
        flush=True,
    )
    n_neg = r.num_hard_negatives + r.num_random_negatives
    extra = []
    for i in selected:
        got = negs[ids[i]["id"]]
        if not got:
            raise ValueError(f"query {ids[i]['id']!r}: no negatives left in the pool after filtering")
        extra.append([index[got[j % len(got)]] for j in range(n_neg)])
    return RLInstances(base, selected, pool_items, extra=extra)


def _evaluate(cfg: RunConfig, checkpoint: str, mode: str, out: str, compare_to: str = "") -> dict:
    """Evaluate an exported checkpoint on the config's benchmark; returns a short summary."""
    from elva_jax.eval.runner import evaluate

    over = [f"eval.mode={mode}", f"eval.out={out}"] + ([f"eval.compare_to={compare_to}"] if compare_to else [])
    if cfg.data.kind == "bundled" and not cfg.eval.data_root:
        over.append(f"eval.data_root={bundled_root(cfg)}")
    res = evaluate(cfg, overrides=over, checkpoint=checkpoint)
    return {"averages": res["averages"], "files": res["files"], "grain_masking": res.get("grain_masking")}


def _has_tokenizer(path: str) -> bool:
    from elva_jax.data.tokenize import has_tokenizer_files

    return bool(path) and has_tokenizer_files(path)


def run(cfg: RunConfig) -> dict:
    from elva_jax.data.pipeline import VIDEO_FIELDS, ImagePolicy, PipelineConfig, make_pipeline
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.hf_checkpoint import resize_vocab, save_params, write_export_info
    from elva_jax.model.lora import LoraConfig, merge_lora
    from elva_jax.train.loop import model_options, train

    check_recipe_available(cfg)  # before any work: a contrastive stage first would be wasted
    maybe_init_distributed()
    t0 = time.perf_counter()
    if jax.default_backend() == "cpu" and shutil.which("nvidia-smi"):
        print(
            "[elva_jax] an NVIDIA GPU driver is present but jax runs on CPU: "
            'install the CUDA build with pip install "elva_jax[cuda]" (README, Environment)',
            flush=True,
        )
    os.makedirs(cfg.run.dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            yaml.safe_dump(configlib.to_dict(cfg), f, sort_keys=False)
    root = bundled_root(cfg) if cfg.data.kind == "bundled" else cfg.data.root
    dropped: list[str] = []  # queries the skip policy left out (summary.json, metrics.jsonl)
    records = build_records(cfg, root, dropped)
    if len(records) < cfg.train.global_batch:
        raise configlib.ConfigError(
            f"train.global_batch {cfg.train.global_batch} exceeds the {len(records)} training records of "
            f"data.root {root!r}: not one full batch"
        )
    mcfg, params = load_model(cfg)
    tok_dir = cfg.model.tokenizer or (cfg.model.checkpoint if _has_tokenizer(cfg.model.checkpoint) else None)
    tokenizer = Tokenizer.from_dir(tok_dir, geometry=mcfg.vision.geometry)
    encoder = train_encoder(cfg, tokenizer)
    need = tokenizer.vocab_size
    if need > mcfg.text.vocab_size:  # the reference resizes the token table to the tokenizer length
        params, mcfg = resize_vocab(params, mcfg, need)
    d, t = cfg.data, cfg.train
    n_proc = jax.process_count()
    if t.global_batch % (t.micro_batches * n_proc):
        raise configlib.ConfigError(
            f"train.global_batch {t.global_batch} is not divisible by micro_batches x processes "
            f"({t.micro_batches} x {n_proc})"
        )
    b = t.global_batch // t.micro_batches // n_proc
    n_cand = b * (1 + d.hard_negatives)
    row_len = d.patch_row_len
    pcfg = PipelineConfig(
        batch_size=b,
        micro_batches=t.micro_batches,
        seq_buckets=tuple(d.seq_buckets),
        # text-only data (NLI) carries no patch arrays, so the vision tower does not run on padding
        patch_budget=None if d.kind == "nli" else (d.patch_rows or b, row_len),
        cand_patch_budget=None if d.kind == "nli" else (d.patch_rows or n_cand, row_len),
        num_negatives=d.hard_negatives,
        seed=d.shuffle_seed,
        num_epochs=max(1, math.ceil(t.epochs)),
        image_policy=ImagePolicy(d.image_policy, d.max_skip_fraction),
        position_mode=cfg.model.position_mode,
        min_pixels=d.min_pixels,
        max_pixels=d.max_pixels,
        geometry=mcfg.vision.geometry,
        **{k: getattr(d, k) for k in VIDEO_FIELDS},
    )
    summary: dict = {"records": len(records), "records_dropped": len(dropped), "records_dropped_first": dropped[:20]}
    _log_dropped(cfg.run.dir, "records_dropped", len(dropped))
    lora_cfg = project(LoraConfig, cfg.lora)
    if t.eval_at_start:  # the starting point of the learning curves: the loaded (or random) model
        _evaluate_all(cfg, params, mcfg, "start", summary)
    if "sft" in t.stages:
        ss = _run_sft(cfg, records, mcfg, params, tokenizer)
        summary["sft"] = {k: ss[k] for k in ("steps", "records", "records_seen", "wall_s")}
        summary["sft"]["loss_first_last"] = [ss["losses"][0], ss["losses"][-1]] if ss["losses"] else []
        if ss["stopped"]:
            return _stopped(cfg, summary, "SFT", ss["steps"], ss["total"], t0)
        params = ss["params"]
    if "contrastive" in t.stages:
        steps_per_epoch = len(records) // t.global_batch
        total = max(1, int(steps_per_epoch * t.epochs))
        if t.max_steps:
            total = min(total, t.max_steps)
        it = make_pipeline(records, encoder, mcfg, pcfg)
        print(
            f"[elva_jax] contrastive: {len(records)} records, {total} steps of {t.global_batch} "
            f"({t.micro_batches} micro-batches) on {jax.device_count()} device(s)",
            flush=True,
        )
        cs = train(
            cfg,
            mcfg,
            params,
            it,
            total,
            emb_token_id=tokenizer.emb_token_id,
            stop_after=cfg.run.stop_after_steps or None,
        )
        state = cs.pop("state")
        params = state.params if state.lora is None else merge_lora(state.params, state.lora, lora_cfg)
        cs["pipeline"] = {"truncated": it.stats.truncated, "skipped": it.stats.skipped, "images": it.stats.images}
        summary.update(cs, steps=total)
        if cs["end_step"] < total:  # preempted or time-boxed: the later stages wait for the rerun
            return _stopped(cfg, summary, "contrastive", cs["end_step"], total, t0)
    if "rl" in t.stages and cfg.rl.recipe == "embed_rl":
        rs = run_embed_rl(cfg, root, mcfg, params, tokenizer)
        if rs["stopped"]:
            summary["rl"] = {"steps": rs["steps"]}
            return _stopped(cfg, summary, "RL", rs["steps"], rs["total"], t0)
        params = rs["lora"] if rs["full_finetune"] else merge_lora(params, rs["lora"], rs["lcfg"])
        summary["rl"] = {
            "recipe": "embed_rl",
            "probes": rs["probes"],
            "steps": rs["steps"],
            "wall_s": rs["wall_s"],
            "reward": [h["reward"] for h in rs["history"]],
        }
    elif "rl" in t.stages:
        from elva_jax.rl.loop import run_rl

        rl_dropped: list[str] = []
        neg_stats: dict = {}
        instances = build_rl_instances(
            cfg, root, params=params, mcfg=mcfg, tokenizer=tokenizer, dropped=rl_dropped, stats_out=neg_stats
        )
        summary["rl_instances_dropped"] = len(rl_dropped)
        _log_dropped(os.path.join(cfg.run.dir, "rl"), "instances_dropped", len(rl_dropped))
        print(
            f"[elva_jax] RL: {len(instances)} instances of 1 positive + {len(instances[0]['cands']) - 1} negatives, "
            f"G={cfg.rl.group_size}",
            flush=True,
        )
        if t.eval_modes:  # the "before RL" side of the comparison, in every evaluated mode
            trained_by = "contrastive" if "contrastive" in t.stages else None
            _evaluate_all(cfg, params, mcfg, "before_rl", summary, trained_by=trained_by, embedding=t.embedding)
        rs = run_rl(
            cfg,
            mcfg,
            params,
            instances,
            tokenizer,
            model_options(cfg, tokenizer),
            run_dir=os.path.join(cfg.run.dir, "rl"),
        )
        if rs["stopped"]:
            summary["rl"] = {"steps": rs["steps"]}
            return _stopped(cfg, summary, "RL", rs["steps"], rs["total"], t0)
        params = merge_lora(params, rs["lora"], rs["lcfg"])
        summary["rl"] = {
            "negatives": neg_stats,
            "probes": rs["probes"],
            "steps": rs["steps"],
            "wall_s": rs["wall_s"],
            "reward": [h["reward"] for h in rs["history"]],
            "phase_s": {
                k: float(np.mean([h[k] for h in rs["history"]]))
                for k in ("time_rollout_s", "time_reforward_s", "time_reward_s", "time_update_s")
            }
            if rs["history"]
            else {},
        }
    export_dir = os.path.join(cfg.run.dir, "export")
    host = host_copy(params)  # a collective: every process takes part
    if jax.process_index() == 0:
        save_params(export_dir, host, mcfg)
        last = "rl" if "rl" in t.stages else "contrastive"
        if last == "rl" and cfg.rl.recipe == "embed_rl":  # the reasoner: a generator, not an embedder
            write_export_info(export_dir, trained_by="embed_rl_reasoner", embedding=None, stages=tuple(t.stages))
        else:
            write_export_info(
                export_dir, trained_by=last, embedding="ret" if last == "rl" else t.embedding, stages=tuple(t.stages)
            )
    del host
    if jax.process_index() == 0:
        for mode in t.eval_modes:
            before = summary.get(_before_key("before_rl", mode), {}).get("files", {}).get("json", "")
            summary[f"eval_{mode}"] = _evaluate(
                cfg, export_dir, mode, os.path.join(cfg.run.dir, "eval", f"final-{mode}"), compare_to=before
            )
    summary.update(export=export_dir, wall_s=time.perf_counter() - t0)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _run_sft(cfg: RunConfig, records, mcfg, params, tokenizer) -> dict:
    """The summary warm start on the sides of ``records`` that carry target summaries."""
    from elva_jax.data.summaries import SummaryRecords
    from elva_jax.rl.warm_start import reasoner_options, run_sft
    from elva_jax.train.loop import model_options

    if cfg.data.kind == "nli":
        raise configlib.ConfigError(
            "train.stages 'sft' needs M-BEIR-format data with summaries (data.kind mbeir or bundled)"
        )
    sft_records = SummaryRecords(records)
    if not len(sft_records):
        raise configlib.ConfigError(
            f"train.stages has 'sft' but none of the {sft_records.records_seen} training records has target summaries "
            "on its query and positive (query_src_content / src_content with a 'summary' string or list)"
        )
    print(
        f"[elva_jax] SFT: {len(sft_records)} of {sft_records.records_seen} training records (query + positive) carry "
        "target summaries; "
        f"{cfg.sft.steps} steps of {cfg.sft.batch} ({'full fine-tuning' if cfg.sft.full_finetune else 'LoRA'}"
        + (f", the Embed-RL reasoner's T-CoT {cfg.sft.target_template!r})" if cfg.rl.recipe == "embed_rl" else ")"),
        flush=True,
    )
    opts = model_options(cfg, tokenizer)
    if cfg.rl.recipe == "embed_rl":  # the reasoner's vocabulary: its T-CoT tags too
        opts = reasoner_options(cfg, tokenizer, model_options(cfg))
    ss = run_sft(cfg, mcfg, params, sft_records, tokenizer, opts, run_dir=os.path.join(cfg.run.dir, "sft"))
    return {**ss, "records": len(sft_records), "records_seen": sft_records.records_seen}


def _before_key(when: str, mode: str) -> str:
    """summary.json key of an evaluation before a stage: ``eval_before_rl`` is the [RET] one (the paper's
    mode), other modes and the start carry their name (``eval_before_rl_eol``, ``eval_start_ret``)."""
    return "eval_before_rl" if (when, mode) == ("before_rl", "ret") else f"eval_{when}_{mode}"


def _evaluate_all(cfg: RunConfig, params, mcfg, when: str, summary: dict, **export_info) -> None:
    """Export ``params`` to ``{run.dir}/export_{when}`` and evaluate it in every ``train.eval_modes`` mode
    into ``{run.dir}/eval/{when}-{mode}``; the results go to ``summary`` (see `_before_key`)."""
    from elva_jax.model.hf_checkpoint import save_params, write_export_info

    host = host_copy(params)  # a collective: every process takes part
    if jax.process_index() == 0:
        out = os.path.join(cfg.run.dir, f"export_{when}")
        save_params(out, host, mcfg)
        if export_info.get("trained_by"):
            stages = tuple(s for s in cfg.train.stages if s != "rl")
            write_export_info(
                out, trained_by=export_info["trained_by"], embedding=export_info["embedding"], stages=stages
            )
        for mode in cfg.train.eval_modes:
            summary[_before_key(when, mode)] = _evaluate(
                cfg, out, mode, os.path.join(cfg.run.dir, "eval", f"{when}-{mode}")
            )
    del host


def _load_frozen(cfg: RunConfig, checkpoint: str, random_preset: str, tokenizer: str, seed_offset: int):
    """A frozen second (or third) model: (model config, params, tokenizer) from ``checkpoint`` or a random
    ``random_preset`` (seeded ``train.seed + seed_offset``, apart from the reasoner), with the run's
    ``model.dtype`` / ``position_mode``; its token table resized to its tokenizer as `run` does."""
    import dataclasses

    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.hf_checkpoint import resize_vocab

    model = dataclasses.replace(cfg.model, checkpoint=checkpoint, random_preset=random_preset)
    mcfg, params = load_model(
        dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed_offset))
    )
    tok_dir = tokenizer or (checkpoint if _has_tokenizer(checkpoint) else None)
    tok = Tokenizer.from_dir(tok_dir, geometry=mcfg.vision.geometry)
    if tok.vocab_size > mcfg.text.vocab_size:
        params, mcfg = resize_vocab(params, mcfg, tok.vocab_size)
    return mcfg, params, tok


def load_embedder(cfg: RunConfig):
    """Embed-RL's frozen embedder (`_load_frozen` of ``embed_rl.embedder_*``, seed offset 1)."""
    e = cfg.embed_rl
    return _load_frozen(cfg, e.embedder_checkpoint, e.embedder_random_preset, e.embedder_tokenizer, 1)


def load_judge(cfg: RunConfig):
    """Embed-RL's frozen judge (PRM; `_load_frozen` of ``embed_rl.prm_*``, seed offset 2)."""
    e = cfg.embed_rl
    return _load_frozen(cfg, e.prm_checkpoint, e.prm_random_preset, e.prm_tokenizer, 2)


def run_embed_rl(cfg: RunConfig, root: str, mcfg, params, tokenizer) -> dict:
    """The RL stage under rl.recipe=embed_rl: pairs (query, positive) from the training queries, the
    reasoner (``model``, a fresh LoRA) trained against the frozen embedder (`load_embedder`) in
    `rl.loop.run_rl`'s resumable loop. Returns what `run_rl` returns."""
    import dataclasses

    from elva_jax.rl.embed_rl_rewards import embed_rl_reward_config
    from elva_jax.rl.embed_rl_trainer import EmbedRLTrainer, FrozenEmbedder, FrozenJudge, reasoner_policy
    from elva_jax.rl.loop import rl_configs, run_rl
    from elva_jax.rl.warm_start import reasoner_options
    from elva_jax.train.loop import model_options

    # pairs only: the rewards' negatives are the other pairs' rollouts (no mining, no sampled negatives)
    r = dataclasses.replace(cfg.rl, negatives="dataset", num_hard_negatives=0, num_random_negatives=0)
    dropped: list[str] = []
    instances = build_rl_instances(dataclasses.replace(cfg, rl=r), root, dropped=dropped)
    _log_dropped(os.path.join(cfg.run.dir, "rl"), "instances_dropped", len(dropped))
    if len(instances) < cfg.rl.instances_per_step:
        raise configlib.ConfigError(
            f"rl.instances_per_step {cfg.rl.instances_per_step} exceeds the {len(instances)} Embed-RL pairs"
        )
    ecfg, eparams, etok = load_embedder(cfg)
    e, d = cfg.embed_rl, cfg.data
    judge = load_judge(cfg) if e.prm_enabled else None
    full = not cfg.lora.enabled
    opts = model_options(cfg)
    rcfg, _ = rl_configs(cfg)
    jname = (
        f", frozen judge {e.prm_checkpoint or e.prm_random_preset} ({judge[0].text.num_layers}-layer)" if judge else ""
    )
    print(
        f"[elva_jax] Embed-RL: {len(instances)} pairs, G={cfg.rl.group_size}, reasoner {mcfg.text.num_layers}-layer "
        f"({'full fine-tuning' if full else 'LoRA'}), frozen embedder "
        f"{e.embedder_checkpoint or e.embedder_random_preset} ({ecfg.text.num_layers}-layer){jname}",
        flush=True,
    )

    def build(tx, mesh, lcfg):
        pix = {"patch_row_len": d.patch_row_len, "min_pixels": d.min_pixels, "max_pixels": d.max_pixels}
        policy = reasoner_policy(
            mcfg,
            reasoner_options(cfg, tokenizer, opts),  # the embedder's opts: no generation vocabulary
            rcfg,
            tx,
            tokenizer,
            request=e.reasoner_instruction,
            lora_scale=lcfg.scale,
            prompt_buckets=tuple(cfg.rl.prompt_buckets),
            mesh=mesh,
            full_finetune=full,
            **pix,
        )
        emb = FrozenEmbedder(
            ecfg,
            opts,
            eparams,
            etok,
            request=e.summarise_instruction,
            buckets=tuple(e.embedder_seq_buckets),
            mesh=mesh,
            micro_rows=e.embedder_micro_rows,
            **pix,
        )
        jud = None
        if judge is not None:
            jcfg, jparams, jtok = judge
            jud = FrozenJudge(
                jcfg,
                opts,
                jparams,
                jtok,
                request=e.prm_instruction,
                buckets=tuple(e.prm_seq_buckets),
                max_new_tokens=e.prm_max_new_tokens,
                hard_pairs=e.prm_hard_pairs,
                answer_parse=e.prm_answer_parse,
                candidate_order=e.prm_candidate_order,
                patch_row_len=d.patch_row_len,
                seed=cfg.train.seed,
                rows_per_call=e.prm_rows_per_call,
                mesh=mesh,
            )
        return EmbedRLTrainer(
            policy,
            emb,
            tokenizer,
            embed_rl_reward_config(cfg),
            format_check=e.format_check,
            key_frame_base=e.key_frame_base,
            judge=jud,
            evidence_kind=e.evidence_kind,
        )

    return run_rl(
        cfg,
        mcfg,
        params,
        instances,
        tokenizer,
        reasoner_options(cfg, tokenizer, opts),
        run_dir=os.path.join(cfg.run.dir, "rl"),
        build_trainer=build,
        full_finetune=full,
    )


def _log_dropped(run_dir: str, key: str, n: int) -> None:
    """One metrics.jsonl line (step 0) with the count of records the skip policy left out, when any."""
    if n:
        logger = MetricsLogger(run_dir)
        logger.log(0, {key: n})
        logger.close()


def _stopped(cfg: RunConfig, summary: dict, stage: str, step: int, total: int, t0: float) -> dict:
    """End a run whose stage stopped early (SIGTERM or run.stop_after_steps) at a saved checkpoint."""
    summary.update(stopped={"stage": stage, "step": step, "total": total}, wall_s=time.perf_counter() - t0)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m elva_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML preset (configs/*.yaml); default: configs/tiny_cpu.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.dir=/tmp/run")
    ap.add_argument("--profile", help="step window to trace with jax.profiler, e.g. 3:5")
    a = ap.parse_args(argv)
    over = list(a.overrides)
    if a.profile:
        lo, _, hi = a.profile.partition(":")
        over.append(f"run.profile_steps=[{int(lo)}, {int(hi or lo)}]")
    try:
        cfg = configlib.load(RunConfig, a.config or default_config_path(), over)
    except configlib.ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    s = run(cfg)
    if "stopped" in s:
        st = s["stopped"]
        print(
            f"[elva_jax] stopped the {st['stage']} stage at step {st['step']}/{st['total']} with a checkpoint in "
            f"{cfg.run.dir}; run the same command to continue"
        )
        return
    if s.get("losses"):
        print(f"[elva_jax] contrastive: {s['end_step']} steps, final loss {s['losses'][-1]:.4f}")
    elif "end_step" in s:  # a rerun of a finished stage resumes at its end: no step ran in this invocation
        print(f"[elva_jax] contrastive: complete at step {s['end_step']} (resumed from its checkpoint)")
    if "rl" in s and s["rl"]["reward"]:
        r = s["rl"]["reward"]
        print(f"[elva_jax] RL: {s['rl']['steps']} steps, mean reward first/last {r[0]:.4f}/{r[-1]:.4f}")
    print(f"[elva_jax] done in {s['wall_s']:.0f}s")
    print(f"[elva_jax] run directory: {cfg.run.dir} (config.yaml, metrics.jsonl, tb/, checkpoints/, rl/, summary.json)")
    print(f"[elva_jax] exported transformers checkpoint: {s['export']}")
