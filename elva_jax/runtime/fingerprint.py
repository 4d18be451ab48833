"""The settings that give a checkpoint's step and data position their meaning (mesh-independent).

A resume whose settings differ in one of these fields stops (`CheckpointIncompatible`) unless the field
is named in `run.allow_changed`. Mesh, dtypes of compute, logging and checkpoint cadence may change
freely: they do not change what step s or record index i means.
"""

from __future__ import annotations

from elva_jax.schema import field_value

_WEIGHTS = ("model.checkpoint", "model.random_preset", "lora.enabled", "lora.rank", "lora.alpha", "lora.targets")
_DATA = ("data.kind", "data.root", "data.train_files")
FIELDS = {
    "contrastive": _WEIGHTS
    + _DATA
    + ("data.pool_file", "data.hard_negatives", "data.shuffle_seed", "train.global_batch", "train.embedding")
    + ("train.seed",),
    "rl": _WEIGHTS
    + _DATA
    + ("rl.instances_per_step", "rl.group_size", "rl.query_fraction", "rl.negatives", "rl.num_hard_negatives")
    + ("rl.num_random_negatives", "rl.probe_instances", "train.seed"),  # probe: held out, so it moves the draws
    "sft": _WEIGHTS
    + _DATA
    + ("data.pool_file", "sft.batch", "sft.full_finetune", "sft.max_target_tokens", "sft.ret_contrastive_weight")
    + ("train.seed",),
}
# Embed-RL's RL stage: ELVA's fields (the reasoner is `model.*`) plus the recipe and the frozen embedder (a
# separate key so that ELVA RL checkpoints written before it keep resuming)
FIELDS["embed_rl"] = FIELDS["rl"] + (
    "rl.recipe",
    "embed_rl.embedder_checkpoint",
    "embed_rl.embedder_random_preset",
    "embed_rl.reasoner_instruction",
    "embed_rl.summarise_instruction",
    "embed_rl.prm_enabled",  # the judge: a third model whose verdicts are part of the reward
    "embed_rl.prm_checkpoint",
    "embed_rl.prm_random_preset",
    "embed_rl.prm_instruction",
)

# the Embed-RL reasoner's warm start: ELVA's SFT fields plus what writes its prompts and targets (a separate
# key, so that ELVA SFT checkpoints keep resuming)
FIELDS["embed_rl_sft"] = FIELDS["sft"] + ("rl.recipe", "sft.target_template", "embed_rl.reasoner_instruction")


def run_fingerprint(cfg, stage: str) -> dict:
    """{dotted field: value} of the stage's fingerprint fields (tuples as lists, as JSON stores them)."""
    out = {}
    for name in FIELDS[stage]:
        v = field_value(cfg, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out
