"""A tiny Embed-RL setup: random LoRA reasoner (Qwen2-VL) + random frozen embedder (Qwen3-VL), text pairs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.prompts import TCOT_JUDGE_INSTRUCTION, TCOT_REASONER_INSTRUCTION, TCOT_SUMMARISE_INSTRUCTION
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model.config import ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.model.params import init_params
from elva_jax.model.tiny import preset_config
from elva_jax.rl.embed_rl_rewards import EmbedRLRewardConfig
from elva_jax.rl.embed_rl_trainer import EmbedRLTrainer, FrozenEmbedder, FrozenJudge, reasoner_policy
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState

G = 3
PAIRS = [
    {"id": "a", "query": {"text": "a red car on a road"}, "cands": [{"text": "red automobile"}, {"text": "x"}]},
    {"id": "b", "query": {"text": "two dogs playing", "instruction": "Find a caption."}, "cands": [{"text": "pups"}]},
]
LCFG = LoraConfig(rank=4, alpha=8)


def make_embed_rl(mesh=None, *, judge: bool = False, full_finetune: bool = False, **judge_kw):
    """(trainer, initial state, tokenizer); with a mesh the state is laid out on it as the RL stage does.
    ``judge``: a tiny random Qwen2.5-VL judge (PRM on); ``full_finetune``: the reasoner's whole params
    train (state.lora = a copy of the params; state.params = the frozen reference)."""
    tok = Tokenizer.from_dir()
    rcfg, ecfg, opts = preset_config("tiny"), preset_config("tiny_qwen3_vl"), ModelOptions()
    rl = RLConfig(group_size=G, max_summary_tokens=6, beta=0.01, adv_ddof=1, adv_eps=1e-6, loss_type="bnpo")
    policy = reasoner_policy(
        rcfg, opts, rl, optax.adamw(1e-3), tok, request=TCOT_REASONER_INSTRUCTION, lora_scale=LCFG.scale,
        prompt_buckets=(256,), media=MediaSettings(patch_row_len=64), mesh=mesh, full_finetune=full_finetune,
    )  # fmt: skip
    policy.scfg = dataclasses.replace(policy.scfg, cache_dtype="float32")
    emb = FrozenEmbedder(
        ecfg, opts, init_params(ecfg, jax.random.key(5), std=0.05), tok, request=TCOT_SUMMARISE_INSTRUCTION,
        buckets=(256,), media=MediaSettings(patch_row_len=64, min_pixels=3136, max_pixels=12544), mesh=mesh,
    )  # fmt: skip
    jud = None
    if judge:
        jcfg = preset_config("tiny_qwen2_5_vl")
        jud = FrozenJudge(
            jcfg, opts, init_params(jcfg, jax.random.key(7), std=0.05), tok, request=TCOT_JUDGE_INSTRUCTION,
            buckets=(512, 1024), max_new_tokens=4, mesh=mesh, **{"hard_pairs": 4, **judge_kw},
        )  # fmt: skip
    tr = EmbedRLTrainer(
        policy, emb, tok, EmbedRLRewardConfig(prm_enabled=judge), format_check="tags", judge=jud
    )  # fmt: skip
    params = init_params(rcfg, jax.random.key(0), std=0.05)
    if full_finetune:
        lora = jax.tree.map(jnp.copy, params)
    else:
        lora = jax.tree.map(lambda x: x + 0.01, init_lora(rcfg, LCFG, jax.random.key(1)))
    state = RLState(0, params, lora, policy.tx.init(lora), jax.random.key(2))
    if mesh is not None:
        from elva_jax.rl.loop import place_rl_state

        state = place_rl_state(state, rcfg, LCFG, policy.tx, mesh, full_finetune)
    return tr, state, tok
