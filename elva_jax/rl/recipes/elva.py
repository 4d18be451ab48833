"""ELVA's RL stage (``rl.recipe=elva``): the embedder itself is the policy; its sampled summaries end in
``[RET]``, whose embeddings are ranked against the instance's candidates (rule-based ranking and margin
rewards, GRPO; `elva_jax.rl.loop.run_rl`)."""

from __future__ import annotations

import os

import numpy as np

from elva_jax.data.media.settings import MediaSettings
from elva_jax.model.lora import merge_lora
from elva_jax.rl.instances import build_rl_instances
from elva_jax.rl.loop import rl_configs, run_rl
from elva_jax.rl.trainer import RLTrainer
from elva_jax.runtime.models import model_options
from elva_jax.runtime.run_data import log_dropped
from elva_jax.schema import RunConfig, project

#: what the stage exports: an embedder read at [RET]
TRAINED_BY, EMBEDDING = "rl", "ret"

_PHASES = ("time_rollout_s", "time_reforward_s", "time_reward_s", "time_update_s")


def run_stage(cfg: RunConfig, root: str, mcfg, params, tokenizer, *, embed=None) -> dict:
    """Build the RL instances (negatives mined with ``embed`` under ``rl.negatives=mined``), train a fresh
    LoRA on them, and return `run_rl`'s result plus ``params`` (the LoRA merged) and ``summary``."""
    dropped: list[str] = []
    neg_stats: dict = {}
    instances = build_rl_instances(cfg, root, embed=embed, dropped=dropped, stats_out=neg_stats)
    log_dropped(os.path.join(cfg.run.dir, "rl"), "instances_dropped", len(dropped))
    print(
        f"[elva_jax] RL: {len(instances)} instances of 1 positive + {len(instances[0]['cands']) - 1} negatives, "
        f"G={cfg.rl.group_size}",
        flush=True,
    )
    rcfg, reward_cfg = rl_configs(cfg)
    r = cfg.rl

    def build(tx, mesh, lcfg):
        return RLTrainer.from_tokenizer(
            mcfg,
            model_options(cfg, tokenizer),
            rcfg,
            reward_cfg,
            tx,
            tokenizer,
            lora_scale=lcfg.scale,
            prompt_buckets=tuple(r.prompt_buckets),
            media=project(MediaSettings, cfg.data),
            mesh=mesh,
        )

    rs = run_rl(cfg, mcfg, params, instances, run_dir=os.path.join(cfg.run.dir, "rl"), build_trainer=build)
    rs["instances_dropped"] = len(dropped)
    if rs["stopped"]:
        return rs
    rs["params"] = merge_lora(params, rs["lora"], rs["lcfg"])
    hist = rs["history"]
    rs["summary"] = {
        "negatives": neg_stats,
        "probes": rs["probes"],
        "steps": rs["steps"],
        "wall_s": rs["wall_s"],
        "reward": [h["reward"] for h in hist],
        "phase_s": {k: float(np.mean([h[k] for h in hist])) for k in _PHASES} if hist else {},
    }
    return rs
