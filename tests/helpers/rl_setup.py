"""A tiny RL setup on the bundled data: model, tokenizer, trainer and instances."""

from __future__ import annotations

import os

import jax
import optax

from elva_jax.data.benchmarks import mbeir
from elva_jax.data.benchmarks.multigrain.generator import generate as generate_data
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.records import contrastive_records
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model.config import ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.model.params import init_params
from elva_jax.model.tiny import preset_config
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState, RLTrainer


def instances(root, n_neg=3):
    if not os.path.exists(os.path.join(root, "meta", "summary.json")):
        generate_data(root, seed=0)
    qs = mbeir.read_queries(os.path.join(root, "query/train/mbeir_multigrain_union_train.jsonl"))
    pool = mbeir.read_pool(os.path.join(root, "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"))
    return contrastive_records(qs, pool, root, num_negatives=n_neg)


def make_trainer(rcfg: RLConfig | None = None, *, cache_dtype=None, seed=0, mesh=None, tx=None):
    """(trainer, state); with a mesh the state is laid out on it as the RL stage does."""
    tok = Tokenizer.from_dir()
    cfg = preset_config("tiny")
    opts = ModelOptions()
    tx = tx or optax.adamw(1e-3)
    rcfg = rcfg or RLConfig(group_size=4, max_summary_tokens=6)
    tr = RLTrainer.from_tokenizer(
        cfg,
        opts,
        rcfg,
        RewardConfig(),
        tx,
        tok,
        lora_scale=LCFG.scale,
        prompt_buckets=(256, 384),
        media=MediaSettings(patch_row_len=64),
        mesh=mesh,
    )
    if cache_dtype:
        import dataclasses

        tr.scfg = dataclasses.replace(tr.scfg, cache_dtype=cache_dtype)
    return tr, fresh_state(tr, seed)


LCFG = LoraConfig(rank=4, alpha=8)


def fresh_state(tr, seed=0):
    """The initial state of `make_trainer` again (same seed: same params, LoRA, key), for another step
    sequence with the same trainer (its jitted functions are compiled once)."""
    params = init_params(tr.cfg, jax.random.key(seed), std=0.05)
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(tr.cfg, LCFG, jax.random.key(seed + 1)))
    state = RLState(0, params, lora, tr.tx.init(lora), jax.random.key(seed + 2))
    if tr.mesh is not None:
        from elva_jax.rl.loop import place_rl_state

        state = place_rl_state(state, tr.cfg, LCFG, tr.tx, tr.mesh)
    return state
