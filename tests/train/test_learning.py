"""The contrastive step learns: a few steps on the LoRA alone raise in-batch retrieval accuracy.

Toy: b = 8 random text queries, each paired with a random image + text candidate (the pairing is the
answer). Accuracy is measured independently of the step's own metrics: embed both sides with the
updated adapters and take a numpy argmax of the query x candidate cosine matrix. Only the LoRA is
trained, so the base parameters must come back bit-identical and every adapter must move. A
sabotaged loss (the step minimising minus InfoNCE) must not learn, so the test can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params

import elva_jax.contrastive.step as step_mod
from elva_jax.contrastive.step import StepConfig, TrainState, embed, train_step
from elva_jax.model.config import ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora

OPTS = ModelOptions(matmul_precision="highest")
LCFG = LoraConfig(rank=4, alpha=8)
SCFG = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, lora_scale=LCFG.scale)
B, STEPS = 8, 12


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    params = tiny_params(cfg)
    lora = init_lora(cfg, LCFG, jax.random.key(1))  # standard init: B = 0, the adapters start as a no-op
    batch = contrastive_batch(cfg, OPTS, A=1, b=B, seed=3)
    mb = jax.tree.map(lambda x: x[0], batch)
    emb = jax.jit(lambda lo, x: embed(params, lo, x, cfg, OPTS, SCFG))

    def accuracy(lo):
        q, c = np.asarray(emb(lo, mb["query"]), np.float64), np.asarray(emb(lo, mb["cand"]), np.float64)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        return float(np.mean(np.argmax(q @ c.T, axis=1) == np.arange(B)))

    return cfg, params, lora, batch, accuracy


def _train(setup, monkeypatch, sabotage):
    cfg, params, lora, batch, accuracy = setup
    if sabotage == "negated_loss":
        real = step_mod.info_nce

        def flipped(q, c, tau):
            loss, m = real(q, c, tau)
            return -loss, {**m, "loss": -loss}

        monkeypatch.setattr(step_mod, "info_nce", flipped)
    tx = optax.adamw(1e-2)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, tx.init(lora), jax.random.key(0), jnp.zeros((), jnp.int32)
    )
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, opts=OPTS, scfg=SCFG, tx=tx))
    losses = []
    for _ in range(STEPS):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, accuracy(lora), accuracy(state.lora), losses


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [None, "negated_loss"])
def test_lora_contrastive_steps_raise_in_batch_accuracy(setup, monkeypatch, sabotage):
    cfg, params, lora, _, _ = setup
    state, before, after, losses = _train(setup, monkeypatch, sabotage)
    # only the adapters train: the base is bit-identical, every adapter matrix moved
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(lora), strict=True):
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0
    assert before <= 0.5  # a random model pairs few of the 8 (chance 1/8)
    if sabotage is None:
        assert after >= 0.875, (before, after, losses)
        assert losses[-1] < 0.5 * losses[0], losses
    else:  # ascending InfoNCE instead of descending it must not learn the pairing
        assert after <= before, (before, after, losses)
