"""The contrastive stage as the run orders it: its prompt convention, its pipeline over the training
records, and the resumable loop (`elva_jax.contrastive.loop.train`) with the LoRA merged at the end."""

from __future__ import annotations

import math

import jax

from elva_jax import configlib
from elva_jax.contrastive.loop import train
from elva_jax.data.conventions import convention
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline
from elva_jax.model.lora import merge_lora
from elva_jax.schema import RunConfig, project


def train_template(cfg: RunConfig) -> str:
    """The prompt template of the contrastive pipeline: that of the ``train.embedding`` convention
    (LamRA's "eol" prompt for eol and last, Qwen3-VL-Embedding's for instruct_last)."""
    return convention(cfg.train.embedding).template


def train_encoder(cfg: RunConfig, tokenizer) -> PromptEncoder:
    """The contrastive pipeline's PromptEncoder (template from :func:`train_template`)."""
    return PromptEncoder(tokenizer, train_template(cfg), default_instruction=cfg.data.default_instruction)


def pipeline_config(cfg: RunConfig, mcfg, tokenizer) -> PipelineConfig:
    """The contrastive pipeline's config: per-process batch of train.global_batch / (micro_batches x
    processes) queries (a config error when that does not divide), patch budgets, buckets, media settings,
    the model's patch geometry and the tokenizer's pad id."""
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
    return PipelineConfig(
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
        pad_token_id=tokenizer.pad_token_id,
        position_mode=cfg.model.position_mode,
        media=project(MediaSettings, d),
        geometry=mcfg.vision.geometry,
    )


def run_stage(cfg: RunConfig, records, mcfg, params, tokenizer, pcfg: PipelineConfig) -> dict:
    """Train on ``records`` for train.epochs (capped by train.max_steps). Returns the loop's result with
    ``params`` (the LoRA merged), ``steps`` (the stage's total) and the pipeline's counts."""
    t = cfg.train
    total = max(1, int(len(records) // t.global_batch * t.epochs))
    if t.max_steps:
        total = min(total, t.max_steps)
    it = make_pipeline(records, train_encoder(cfg, tokenizer), mcfg, pcfg)
    print(
        f"[elva_jax] contrastive: {len(records)} records, {total} steps of {t.global_batch} "
        f"({t.micro_batches} micro-batches) on {jax.device_count()} device(s)",
        flush=True,
    )
    cs = train(
        cfg, mcfg, params, it, total, emb_token_id=tokenizer.emb_token_id, stop_after=cfg.run.stop_after_steps or None
    )
    state = cs.pop("state")
    cs["params"] = state.params if state.lora is None else merge_lora(state.params, state.lora, cfg.lora)
    cs["pipeline"] = {"truncated": it.stats.truncated, "skipped": it.stats.skipped, "images": it.stats.images}
    cs["steps"] = total
    return cs
