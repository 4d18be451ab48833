"""LoRA dropout (lora.dropout, LamRA 0.05): the LoRA branch's input is dropped in training forwards only;
masks follow the state's RNG; both passes of gradient accumulation see the same masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params

from elva_jax.contrastive.step import StepConfig, TrainState, contrastive_loss_and_grads, embed, train_step
from elva_jax.model.config import ModelOptions
from elva_jax.model.layers import dense
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.retrieval.losses import info_nce
from elva_jax.runtime.optim import OptimConfig, make_optimizer

OPTS = ModelOptions(matmul_precision="highest")
LCFG = LoraConfig(rank=4, alpha=8)
RATE = 0.3
SCFG = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, lora_scale=LCFG.scale, lora_dropout=RATE)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg()
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(cfg, LCFG, jax.random.key(1)))  # B != 0: the branch acts
    return cfg, tiny_params(cfg), lora


def test_dense_drops_only_the_lora_input_with_inverted_scaling():
    """Identity A and B: the LoRA branch returns drop(x) itself, to be compared with the hand rule."""
    d, n = 8, 4096
    x = jnp.ones((n, d), jnp.float32)
    p = {"kernel": 2.0 * jnp.eye(d)}
    lora = {"a": jnp.eye(d), "b": jnp.eye(d)}
    y = dense(x, p, jnp.float32, lora=lora, dropout=(jax.random.key(3), RATE))
    branch = np.asarray(y - 2.0)  # the base path is untouched
    kept = branch != 0
    np.testing.assert_allclose(branch[kept], 1 / (1 - RATE), rtol=1e-6)
    frac = float((branch == 0).mean())
    assert abs(frac - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / branch.size)
    np.testing.assert_array_equal(dense(x, p, jnp.float32, lora=lora), 3.0 * np.ones((n, d)))


def test_dropout_changes_the_training_forward_not_the_eval_forward(model):
    cfg, params, lora = model
    batch = contrastive_batch(cfg, OPTS, A=1, b=4, negs=0, seed=2)
    q = jax.tree.map(lambda x: x[0], batch["query"])
    f = jax.jit(lambda k: embed(params, lora, q, cfg, OPTS, SCFG, k))
    e_eval = embed(params, lora, q, cfg, OPTS, SCFG)  # no key: the eval / export forward
    ref = embed(params, lora, q, cfg, OPTS, StepConfig(embedding="eol", emb_token_id=EMB, lora_scale=LCFG.scale))
    np.testing.assert_array_equal(e_eval, ref)
    e1, e1b, e2 = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
    np.testing.assert_array_equal(e1, e1b)  # a key gives one mask
    assert float(jnp.abs(e1 - e_eval).max()) > 1e-4 and float(jnp.abs(e1 - e2).max()) > 1e-4
    # without LoRA (the RL reference policy, full fine-tuning) a key changes nothing
    np.testing.assert_array_equal(
        embed(params, None, q, cfg, OPTS, SCFG, jax.random.key(0)), embed(params, None, q, cfg, OPTS, SCFG)
    )


def test_train_step_masks_follow_the_state_rng(model):
    cfg, params, lora = model
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    batch = contrastive_batch(cfg, OPTS, A=1, b=4, negs=0, seed=4)

    def run(scfg, rng):
        state = TrainState(jnp.zeros((), jnp.int32), params, lora, tx.init(lora), rng, jnp.zeros((), jnp.int32))
        return jax.jit(lambda s, b: train_step(s, b, cfg=cfg, opts=OPTS, scfg=scfg, tx=tx))(state, batch)[1]["loss"]

    no_drop = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, lora_scale=LCFG.scale)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    assert float(run(no_drop, k0)) == float(run(no_drop, k1))  # without dropout the RNG plays no part
    a, b, c = float(run(SCFG, k0)), float(run(SCFG, k0)), float(run(SCFG, k1))
    assert a == b and a != c and a != float(run(no_drop, k0))


def test_accumulation_passes_share_the_masks(model):
    """A = 2 micro-batches through the gradient cache == the direct gradient of the same masked forwards."""
    cfg, params, lora = model
    batch = contrastive_batch(cfg, OPTS, A=2, b=2, negs=1, seed=6)
    rng = jax.random.key(7)
    (loss, _), grads = jax.jit(lambda t: contrastive_loss_and_grads(t, params, batch, cfg, OPTS, SCFG, rng))(lora)

    def direct(tr):
        qs, cs = [], []
        for i in range(2):
            mb = jax.tree.map(lambda x, i=i: x[i], batch)
            k = jax.random.fold_in(rng, i)
            qs.append(embed(params, tr, mb["query"], cfg, OPTS, SCFG, jax.random.fold_in(k, 0)))
            cs.append(embed(params, tr, mb["cand"], cfg, OPTS, SCFG, jax.random.fold_in(k, 1)))
        pos = jnp.concatenate([c[:2] for c in cs])
        neg = jnp.concatenate([c[2:] for c in cs])
        return info_nce(jnp.concatenate(qs), jnp.concatenate([pos, neg]), SCFG.tau)[0]

    want_loss, want = jax.jit(jax.value_and_grad(direct))(lora)
    assert abs(float(loss) - float(want_loss)) < 1e-5
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
