"""Embed-RL's RL stage (``rl.recipe=embed_rl``): a reasoner (the run's model) trained by GRPO against a frozen
embedder (and optionally a frozen judge), on (query, positive) pairs of the training data."""

from __future__ import annotations

import dataclasses
import os

from elva_jax import configlib
from elva_jax.data.media.settings import MediaSettings
from elva_jax.model.lora import merge_lora
from elva_jax.rl.embed_rl_rewards import embed_rl_reward_config
from elva_jax.rl.embed_rl_trainer import EmbedRLTrainer, FrozenEmbedder, FrozenJudge, reasoner_policy
from elva_jax.rl.instances import build_rl_instances
from elva_jax.rl.loop import rl_configs, run_rl
from elva_jax.rl.warm_start import reasoner_options
from elva_jax.runtime.models import load_model, model_options
from elva_jax.runtime.run_data import log_dropped
from elva_jax.schema import RunConfig, project

#: what the stage exports: a generator, not an embedder
TRAINED_BY, EMBEDDING = "embed_rl_reasoner", None


def _load_frozen(cfg: RunConfig, checkpoint: str, random_preset: str, tokenizer: str, seed_offset: int):
    """A frozen model of the recipe: (model config, params, tokenizer) of ``checkpoint``, or a random
    ``random_preset`` seeded ``train.seed + seed_offset`` (apart from the reasoner's)."""
    return load_model(
        checkpoint,
        random_preset=random_preset,
        tokenizer=tokenizer,
        seed=cfg.train.seed + seed_offset,
        param_dtype=cfg.model.param_dtype,
    )


def load_embedder(cfg: RunConfig):
    """Embed-RL's frozen embedder (``embed_rl.embedder_*``; random: seed offset 1)."""
    e = cfg.embed_rl
    return _load_frozen(cfg, e.embedder_checkpoint, e.embedder_random_preset, e.embedder_tokenizer, 1)


def load_judge(cfg: RunConfig):
    """Embed-RL's frozen judge (PRM; ``embed_rl.prm_*``; random: seed offset 2)."""
    e = cfg.embed_rl
    return _load_frozen(cfg, e.prm_checkpoint, e.prm_random_preset, e.prm_tokenizer, 2)


def run_stage(cfg: RunConfig, root: str, mcfg, params, tokenizer, *, embed=None) -> dict:
    """The RL stage under rl.recipe=embed_rl: pairs (query, positive) from the training queries, the
    reasoner (``model``, a fresh LoRA) trained against the frozen embedder (`load_embedder`) in
    `rl.loop.run_rl`'s resumable loop. Returns what `run_rl` returns."""
    # pairs only: the rewards' negatives are the other pairs' rollouts (no mining, no sampled negatives)
    r = dataclasses.replace(cfg.rl, negatives="dataset", num_hard_negatives=0, num_random_negatives=0)
    dropped: list[str] = []
    instances = build_rl_instances(dataclasses.replace(cfg, rl=r), root, dropped=dropped)
    log_dropped(os.path.join(cfg.run.dir, "rl"), "instances_dropped", len(dropped))
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
        media = project(MediaSettings, d)
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
            media=media,
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
            media=media,
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

    rs = run_rl(
        cfg, mcfg, params, instances, run_dir=os.path.join(cfg.run.dir, "rl"), build_trainer=build, full_finetune=full
    )
    if not rs["stopped"]:
        rs["params"] = rs["lora"] if full else merge_lora(params, rs["lora"], rs["lcfg"])
        rs["summary"] = {
            "recipe": "embed_rl",
            "probes": rs["probes"],
            "steps": rs["steps"],
            "wall_s": rs["wall_s"],
            "reward": [h["reward"] for h in rs["history"]],
        }
    return rs
