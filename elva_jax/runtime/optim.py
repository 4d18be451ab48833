"""Optimizer: AdamW with linear warmup then cosine decay (optax), optional global-norm clipping."""

from __future__ import annotations

import optax

from elva_jax.schema import OptimConfig


def schedule(ocfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = int(round(ocfg.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=ocfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=ocfg.lr * ocfg.end_lr_ratio,
    )


def make_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay
    )
    if ocfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), adamw)
    return adamw
