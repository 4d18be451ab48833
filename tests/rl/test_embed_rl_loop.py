"""Embed-RL's two-model step: a tiny random LoRA reasoner (Qwen2-VL) against a tiny random frozen embedder
(Qwen3-VL). Oracles: each rollout re-embedded alone (unpadded, its <emb> position found in Python), the
similarity layout written out pair by pair, GRPO advantages in numpy; only the reasoner's LoRA moves."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from elva_jax.data.prompts import TCOT_REASONER_INSTRUCTION, TCOT_SUMMARISE_INSTRUCTION, tcot_embed_prompt
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.model.params import init_params
from elva_jax.model.tiny import preset_config
from elva_jax.rl.embed_rl_rewards import EmbedRLRewardConfig, batch_rewards
from elva_jax.rl.embed_rl_trainer import EmbedRLTrainer, FrozenEmbedder, reasoner_policy
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState

G = 3
PAIRS = [
    {"id": "a", "query": {"text": "a red car on a road"}, "cands": [{"text": "red automobile"}, {"text": "x"}]},
    {"id": "b", "query": {"text": "two dogs playing", "instruction": "Find a caption."}, "cands": [{"text": "pups"}]},
]
LCFG = LoraConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.from_dir()
    rcfg, ecfg, opts = preset_config("tiny"), preset_config("tiny_qwen3_vl"), ModelOptions()
    rl = RLConfig(group_size=G, max_summary_tokens=6, beta=0.01, adv_ddof=1, adv_eps=1e-6, loss_type="bnpo")
    policy = reasoner_policy(
        rcfg, opts, rl, optax.adamw(1e-3), tok, request=TCOT_REASONER_INSTRUCTION, lora_scale=LCFG.scale,
        prompt_buckets=(256,), patch_row_len=64,
    )  # fmt: skip
    policy.scfg = policy.scfg.__class__(**{**policy.scfg.__dict__, "cache_dtype": "float32"})
    emb = FrozenEmbedder(
        ecfg, opts, init_params(ecfg, jax.random.key(5), std=0.05), tok, request=TCOT_SUMMARISE_INSTRUCTION,
        buckets=(256,), patch_row_len=64, min_pixels=3136, max_pixels=12544,
    )  # fmt: skip
    tr = EmbedRLTrainer(policy, emb, tok, EmbedRLRewardConfig(), format_check="tags")
    params = init_params(rcfg, jax.random.key(0), std=0.05)
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(rcfg, LCFG, jax.random.key(1)))
    return tr, RLState(0, params, lora, policy.tx.init(lora), jax.random.key(2)), tok


def _host(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def test_step_scores_every_rollout_with_the_frozen_embedder_and_moves_only_the_lora(setup):
    tr, st, tok = setup
    base0, emb0, lora0 = _host(st.params), _host(tr.embedder.params), _host(st.lora)
    metrics = []
    for _ in range(2):
        st, m = tr.step(st, PAIRS)
        metrics.append(m)
    assert st.step == 2
    for m in metrics:
        for k in ("reward", "orm", "acc", "margin", "format", "loss", "kl_mean", "grad_norm", "cot_len"):
            assert np.isfinite(m[k]), k
        assert m["skipped_update"] == 0.0 and m["tokens_sampled"] > 0
        assert m["sampler_vs_trainer_logp"] < 1e-4  # fp32 cache: the re-forward's log-probs are the sampler's
    assert metrics[1]["kl_mean"] > 0  # after one update the policy differs from the LoRA-off reference
    for a, b in zip(_host(st.params), base0, strict=True):  # the reasoner's base: bit-identical
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_host(tr.embedder.params), emb0, strict=True):  # the embedder: bit-identical
        np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(a - b).max()) for a, b in zip(_host(st.lora), lora0)) > 0

    # oracle for the last step: every rollout embedded alone, unpadded, at its <emb> position
    e = tr.embedder
    I, S = len(PAIRS), 2
    texts = tr.last_texts
    assert len(texts) == I * S * G
    got = np.asarray(tr.last_embeddings)
    want = []
    for i, pair in enumerate(PAIRS):
        for s, side in enumerate((pair["query"], pair["cands"][0])):
            for g in range(G):
                cot = texts[(i * S + s) * G + g]
                prompt = tcot_embed_prompt(side["text"], 0, side.get("instruction"), cot=cot, request=e.request)
                ids = tok.encode_prompt(prompt, None, max_length=256)["input_ids"]
                x = build_inputs(e.cfg, e.opts, np.asarray(ids)[None], np.ones((1, len(ids)), np.int32), None, None)
                h = np.asarray(backbone.forward(e.params, x, e.cfg, e.opts).hidden[0], np.float64)
                v = h[len(ids) - 1 - list(ids)[::-1].index(tok.emb_token_id)]
                want.append(v / np.linalg.norm(v))
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # pair-major query / positive rollouts and their in-batch similarity matrix
    w = want.reshape(I, S, G, -1)
    q, p = w[:, 0].reshape(I * G, -1), w[:, 1].reshape(I * G, -1)
    sims = np.array([[q[a] @ p[b] for b in range(I * G)] for a in range(I * G)], np.float32)
    flags = np.zeros((I * G,), np.float32)  # random models write no T-CoT
    assert metrics[1]["format"] == 0.0
    r = batch_rewards(sims, np.repeat(np.arange(I), G), flags, flags, tr.reward_cfg)
    for side in ("query", "positive"):
        np.testing.assert_allclose(np.asarray(tr.last_rewards[side]["total"]), np.asarray(r[side]["total"]), atol=1e-5)
    # GRPO groups: each prompt's G rollouts (torch-style unbiased std, eps 1e-6)
    tot = np.stack([np.asarray(r["query"]["total"]).reshape(I, G), np.asarray(r["positive"]["total"]).reshape(I, G)], 1)
    adv = (tot - tot.mean(-1, keepdims=True)) / (tot.std(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(tr.last_advantages), adv, rtol=1e-3, atol=1e-3)
