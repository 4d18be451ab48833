"""Assemble a run from its config: data, model, tokenizer, pipeline, training loop, export.

`python -m elva_jax.train [--config FILE] [key=value ...]`; with no arguments the tiny CPU preset
runs on the bundled multi-grain dataset (generated into the run directory on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import zlib

import jax
import numpy as np
import yaml

from elva_jax import configlib
from elva_jax.contrastive import stage as contrastive
from elva_jax.data.media.settings import MediaSettings
from elva_jax.eval.embed import Embedder
from elva_jax.eval.embed_config import EmbedConfig
from elva_jax.eval.runner import evaluate
from elva_jax.model.hf_checkpoint import save_params, write_export_info
from elva_jax.parallel.sharding import host_copy
from elva_jax.rl.recipes import recipe
from elva_jax.rl.warm_start import run_sft_stage
from elva_jax.runtime.models import load_run_model, model_options
from elva_jax.runtime.run_data import build_records, bundled_root, data_root, log_dropped
from elva_jax.schema import RunConfig, check_recipe_available, project


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

    crc = 0
    for x in jax.tree.leaves(params):
        if getattr(x, "is_fully_addressable", True):
            crc = zlib.crc32(np.ascontiguousarray(jax.device_get(x)).view(np.uint8).tobytes(), crc)
        else:  # spread over hosts: hosts hold different shards, so only what they share (shape, dtype)
            crc = zlib.crc32(f"{x.shape}{x.dtype}".encode(), crc)
    return f"{crc:08x}"


def _evaluate(cfg: RunConfig, checkpoint: str, mode: str, out: str, compare_to: str = "") -> dict:
    """Evaluate an exported checkpoint on the config's benchmark; returns a short summary."""
    over = [f"eval.mode={mode}", f"eval.out={out}"] + ([f"eval.compare_to={compare_to}"] if compare_to else [])
    if cfg.data.kind == "bundled" and not cfg.eval.data_root:
        over.append(f"eval.data_root={bundled_root(cfg)}")
    res = evaluate(cfg, overrides=over, checkpoint=checkpoint)
    return {"averages": res["averages"], "files": res["files"], "grain_masking": res.get("grain_masking")}


def _announce_cpu_fallback() -> None:
    if jax.default_backend() == "cpu" and shutil.which("nvidia-smi"):
        print(
            "[elva_jax] an NVIDIA GPU driver is present but jax runs on CPU: "
            'install the CUDA build with pip install "elva_jax[cuda]" (docs/environment.md)',
            flush=True,
        )


def mining_embed(cfg: RunConfig, params, mcfg, tokenizer):
    """``embed(records, name, cache_dir)`` for mining RL negatives: the current model in the convention of
    ``rl.mining_embedding`` (evaluation's embedder, cached per run, stage and params digest), built on
    first use (a recipe that mines nothing never builds it)."""
    built = []

    def embed(records, name: str, cache_dir: str):
        if not built:
            d = cfg.data
            ecfg = EmbedConfig(
                mode=cfg.rl.mining_embedding,
                seq_buckets=tuple(d.seq_buckets),
                default_instruction=d.default_instruction,
                media=project(MediaSettings, d),
            )
            identity = {"run": os.path.abspath(cfg.run.dir), "stage": "pre-rl", "params": params_digest(params)}
            built.append(Embedder(params, mcfg, tokenizer, ecfg, opts=model_options(cfg), identity=identity))
        return built[0].embed(records, name=name, cache_dir=cache_dir)

    return embed


def _start(cfg: RunConfig) -> None:
    """Before any work: refuse what the recipe cannot run, join the other hosts, record the config."""
    check_recipe_available(cfg)  # a contrastive stage first would be wasted
    maybe_init_distributed()
    _announce_cpu_fallback()
    os.makedirs(cfg.run.dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            yaml.safe_dump(configlib.to_dict(cfg), f, sort_keys=False)


def run(cfg: RunConfig) -> dict:
    """The run: its stages in train.stages order (sft -> contrastive -> rl), then export and evaluation.
    Each stage resumes from its own checkpoints; a stage stopped early ends the run (`_stopped`)."""
    _start(cfg)
    t0 = time.perf_counter()
    t = cfg.train
    root = data_root(cfg)
    dropped: list[str] = []  # queries the skip policy left out (summary.json, metrics.jsonl)
    records = build_records(cfg, root, dropped)
    if len(records) < t.global_batch:
        raise configlib.ConfigError(
            f"train.global_batch {t.global_batch} exceeds the {len(records)} training records of "
            f"data.root {root!r}: not one full batch"
        )
    mcfg, params, tokenizer = load_run_model(cfg)
    pcfg = contrastive.pipeline_config(cfg, mcfg, tokenizer) if "contrastive" in t.stages else None
    summary: dict = {"records": len(records), "records_dropped": len(dropped), "records_dropped_first": dropped[:20]}
    log_dropped(cfg.run.dir, "records_dropped", len(dropped))
    if t.eval_at_start:  # the starting point of the learning curves: the loaded (or random) model
        _evaluate_all(cfg, params, mcfg, "start", summary)
    if "sft" in t.stages:
        ss = run_sft_stage(cfg, records, mcfg, params, tokenizer)
        summary["sft"] = {k: ss[k] for k in ("steps", "records", "records_seen", "wall_s")}
        summary["sft"]["loss_first_last"] = [ss["losses"][0], ss["losses"][-1]] if ss["losses"] else []
        if ss["stopped"]:
            return _stopped(cfg, summary, "SFT", ss["steps"], ss["total"], t0)
        params = ss["params"]
    if "contrastive" in t.stages:
        cs = contrastive.run_stage(cfg, records, mcfg, params, tokenizer, pcfg)
        params = cs.pop("params")
        summary.update(cs)
        if cs["end_step"] < cs["steps"]:  # preempted or time-boxed: the later stages wait for the rerun
            return _stopped(cfg, summary, "contrastive", cs["end_step"], cs["steps"], t0)
    rl_recipe = recipe(cfg.rl.recipe)
    if "rl" in t.stages:
        if t.eval_modes:  # the "before RL" side of the comparison, in every evaluated mode
            trained_by = "contrastive" if "contrastive" in t.stages else None
            _evaluate_all(cfg, params, mcfg, "before_rl", summary, trained_by=trained_by, embedding=t.embedding)
        embed = mining_embed(cfg, params, mcfg, tokenizer)
        rs = rl_recipe.run_stage(cfg, root, mcfg, params, tokenizer, embed=embed)
        if "instances_dropped" in rs:
            summary["rl_instances_dropped"] = rs["instances_dropped"]
        if rs["stopped"]:
            summary["rl"] = {"steps": rs["steps"]}
            return _stopped(cfg, summary, "RL", rs["steps"], rs["total"], t0)
        params, summary["rl"] = rs["params"], rs["summary"]
    export_dir = _export(cfg, params, mcfg, rl_recipe)
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


def _export(cfg: RunConfig, params, mcfg, rl_recipe) -> str:
    """Write the final model to {run.dir}/export (transformers layout) with its export record: which stage
    trained it and the embedding it is read with."""
    export_dir = os.path.join(cfg.run.dir, "export")
    t = cfg.train
    host = host_copy(params)  # a collective: every process takes part
    if jax.process_index() == 0:
        save_params(export_dir, host, mcfg)
        if "rl" in t.stages:
            trained_by, embedding = rl_recipe.TRAINED_BY, rl_recipe.EMBEDDING
        else:
            trained_by, embedding = "contrastive", t.embedding
        write_export_info(export_dir, trained_by=trained_by, embedding=embedding, stages=tuple(t.stages))
    del host
    return export_dir


def _before_key(when: str, mode: str) -> str:
    """summary.json key of an evaluation before a stage: ``eval_before_rl`` is the [RET] one (the paper's
    mode), other modes and the start carry their name (``eval_before_rl_eol``, ``eval_start_ret``)."""
    return "eval_before_rl" if (when, mode) == ("before_rl", "ret") else f"eval_{when}_{mode}"


def _evaluate_all(cfg: RunConfig, params, mcfg, when: str, summary: dict, **export_info) -> None:
    """Export ``params`` to ``{run.dir}/export_{when}`` and evaluate it in every ``train.eval_modes`` mode
    into ``{run.dir}/eval/{when}-{mode}``; the results go to ``summary`` (see `_before_key`)."""
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


def _stopped(cfg: RunConfig, summary: dict, stage: str, step: int, total: int, t0: float) -> dict:
    """End a run whose stage stopped early (SIGTERM or run.stop_after_steps) at a saved checkpoint."""
    summary.update(stopped={"stage": stage, "step": step, "total": total}, wall_s=time.perf_counter() - t0)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> None:

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
