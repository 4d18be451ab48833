"""Embed-RL's two-model step: a tiny random LoRA reasoner (Qwen2-VL) against a tiny random frozen embedder
(Qwen3-VL). Oracles: each rollout re-embedded alone (unpadded, its <emb> position found in Python), the
similarity layout written out pair by pair, GRPO advantages in numpy; only the reasoner's LoRA moves."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.embed_rl_setup import PAIRS, G, make_embed_rl

from elva_jax.data.prompts import tcot_embed_prompt
from elva_jax.model import backbone
from elva_jax.model.inputs import build_inputs
from elva_jax.rl.embed_rl_rewards import batch_rewards


@pytest.fixture(scope="module")
def setup():
    return make_embed_rl()


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
    assert tr.last_samples.ret_emb is None  # the reasoner's sampler builds no [RET] embeddings
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
    # embed_rl.embedder_micro_rows: the same rows through the model 5 at a time (3 calls, the last one short)
    sides = [side for pair in PAIRS for side in (pair["query"], pair["cands"][0]) for _ in range(G)]
    calls, jitted = [], e._embed
    e._embed, e.micro_rows = (lambda p, x: calls.append(x["input_ids"].shape) or jitted(p, x)), 5
    try:
        np.testing.assert_allclose(np.asarray(e.embed(sides, texts)), want, atol=2e-5)
    finally:
        e._embed, e.micro_rows = jitted, 0
    assert [c[0] for c in calls] == [5, 5, 2]
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


@pytest.mark.slow
def test_tiny_embed_rl_run_end_to_end(tmp_path):
    """`python -m elva_jax.train --config configs/tiny_embed_rl.yaml`: the bundled pairs, two RL steps with
    finite metrics, an RL checkpoint, and the reasoner exported as a reasoner (not an embedder)."""
    import json
    import os

    from elva_jax import configlib
    from elva_jax.schema import RunConfig
    from elva_jax.train.stages import run

    preset = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_embed_rl.yaml")
    # the preset's shapes without its warm start and probe (those have their own tests)
    over = [
        f"run.dir={tmp_path}",
        "rl.steps=2",
        "rl.group_size=2",
        "train.stages=[rl]",
        "rl.probe_instances=0",
        "rl.instances_per_step=2",
        "rl.max_summary_tokens=8",
    ]
    cfg = configlib.load(RunConfig, preset, over)
    s = run(cfg)
    assert s["rl"]["recipe"] == "embed_rl" and s["rl"]["steps"] == 2 and np.all(np.isfinite(s["rl"]["reward"]))
    lines = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    steps = [x for x in lines if "orm" in x]
    assert len(steps) == 2 and all(np.isfinite(x[k]) for x in steps for k in ("loss", "orm", "kl_mean"))
    assert os.listdir(tmp_path / "rl" / "checkpoints")
    info = json.load(open(os.path.join(s["export"], "elva_export.json")))
    assert info["trained_by"] == "embed_rl_reasoner" and info["embedding"] is None


@pytest.mark.slow
def test_one_step_on_a_2x2x2_mesh_matches_one_device():
    """The same step (the one-device samples replayed) on 8 CPU devices: same texts, embeddings, rewards,
    loss and LoRA update up to float reduction order; the embedder laid out on the mesh stays unchanged."""
    import os

    from helpers.device_check import run_check

    r = run_check(os.path.join(os.path.dirname(__file__), "embed_rl_loop_mesh_check.py"), timeout=900)
    assert r["devices"] == 8 and r["mesh"] == [2, 2, 2] and r["same_texts"] and r["embedder_unchanged"]
    assert r["emb_diff"] <= 1e-5, r
    a, b = r["single"], r["sharded"]
    assert a["tokens_sampled"] == b["tokens_sampled"] and a["cot_len"] == b["cot_len"]
    for k in ("reward", "orm", "acc", "margin"):
        assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)
    assert abs(a["kl_mean"] - b["kl_mean"]) <= 1e-3 * abs(a["kl_mean"]) + 1e-7, (a, b)
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) + 2e-6, (a, b)
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"], (a, b)
    assert r["lora_moved"] > 0 and r["lora_diff"] <= 1e-3 * r["lora_moved"], r
