"""Prefix-shared teacher forcing equals the full-sequence pass: log-probs, [RET] embeddings, LoRA gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers.contrastive import tiny_cfg, tiny_params

from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.rl.rollout import RLConfig, teacher_forced, teacher_forced_shared

OPTS = ModelOptions(matmul_precision="highest")


def test_shared_prefix_equals_full_sequences():
    cfg = tiny_cfg()
    params = tiny_params(cfg, seed=2)
    lcfg = LoraConfig(rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x + 0.03, init_lora(cfg, lcfg, jax.random.key(3)))
    rng = np.random.default_rng(0)
    D, G, P, T = 3, 2, 9, 5
    # left-padded prompts, one with an image
    ids = np.zeros((D, P), np.int32)
    am = np.zeros_like(ids)
    lens = [9, 6, 9]
    img_row = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    for d, n in enumerate(lens):
        row = list(rng.integers(1, 400, n))
        if d == 2:
            row = row[:2] + img_row + row[: n - 8]
        ids[d, P - len(row) :], am[d, P - len(row) :] = row, 1
    pv = rng.standard_normal((16, 1176)).astype(np.float32)
    grid = np.array([[1, 4, 4]])
    gen = rng.integers(1, 400, (D * G, T)).astype(np.int32)
    glen = rng.integers(1, T + 1, D * G).astype(np.int32)
    gen = np.where(np.arange(T)[None] < glen[:, None], gen, 0)
    rcfg = RLConfig(logp_chunk=4)
    # full sequences: each sample row carries its prompt (and image) again
    rep = np.repeat(np.arange(D), G)
    fids = np.concatenate([ids[rep], gen], 1)
    fam = np.concatenate([am[rep], (np.arange(T)[None] < glen[:, None]).astype(np.int32)], 1)
    full_inputs = build_inputs(cfg, OPTS, fids, fam, np.concatenate([pv] * G), np.repeat(grid, G, 0))
    prompts = build_inputs(cfg, OPTS, ids, am, pv, grid)

    def f_full(lo):
        lp, e = teacher_forced(params, lo, lcfg.scale, full_inputs, gen, glen, P, cfg, OPTS, rcfg)
        return lp, e

    def f_shared(lo):
        return teacher_forced_shared(params, lo, lcfg.scale, prompts, gen, glen, G, cfg, OPTS, rcfg)

    lp1, e1 = jax.jit(f_full)(lora)
    lp2, e2 = jax.jit(f_shared)(lora)
    m = np.arange(T)[None] < glen[:, None]
    np.testing.assert_allclose(np.asarray(lp2)[m], np.asarray(lp1)[m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-5)

    w = jnp.asarray(rng.standard_normal(e1.shape), jnp.float32)

    def scalar(fn):
        return lambda lo: jnp.sum(jnp.where(m, fn(lo)[0], 0.0)) + jnp.sum(fn(lo)[1] * w)

    g1 = jax.jit(jax.grad(scalar(f_full)))(lora)
    g2 = jax.jit(jax.grad(scalar(f_shared)))(lora)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max() + 1e-12))
