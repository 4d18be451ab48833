"""Contrastive train step: InfoNCE against numpy, exact accumulation, 8 devices vs 1, non-finite skip."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params
from helpers.device_check import run_check

from elva_jax.model.config import ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.runtime.optim import OptimConfig, make_optimizer
from elva_jax.train.losses import info_nce
from elva_jax.train.step import StepConfig, TrainState, contrastive_loss_and_grads, train_step

OPTS = ModelOptions(matmul_precision="highest")
LCFG = LoraConfig(rank=4, alpha=8)
SCFG = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, lora_scale=LCFG.scale)


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8))
    c = rng.standard_normal((7, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    want = 0.0
    for n in range(4):
        s = [q[n] @ c[m] / 0.05 for m in range(7)]
        want += -(s[n] - np.log(np.sum(np.exp(s)))) / 4
    got, _ = info_nce(jnp.asarray(q), jnp.asarray(c), 0.05)
    assert abs(float(got) - want) < 1e-5


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg()
    params = tiny_params(cfg)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(cfg, LCFG, jax.random.key(1)))
    return cfg, params, lora


def _split(batch, A):
    """Re-cut a 1-micro-batch batch into A micro-batches (positives and negatives split alike)."""
    q, c = batch["query"], batch["cand"]
    b = q["input_ids"].shape[1]
    mb = b // A
    n_neg = c["input_ids"].shape[1] // b - 1

    def take(x, rows, axis):
        return np.take(np.asarray(x[0]), rows, axis=axis)

    out = {"query": [], "cand": []}
    for a in range(A):
        qrows = np.arange(a * mb, (a + 1) * mb)
        crows = np.concatenate([qrows] + [b + k * b + qrows for k in range(n_neg)])
        out["query"].append({k: take(v, qrows, 1 if k == "positions" else 0) for k, v in q.items()})
        out["cand"].append({k: take(v, crows, 1 if k == "positions" else 0) for k, v in c.items()})
    return {k: jax.tree.map(lambda *xs: np.stack(xs), *v) for k, v in out.items()}


def test_accumulation_equals_large_batch(model):
    cfg, params, lora = model
    big = contrastive_batch(cfg, OPTS, A=1, b=4, negs=1, seed=5)
    small = _split(big, 2)
    (l1, _), g1 = jax.jit(lambda t, b: contrastive_loss_and_grads(t, params, b, cfg, OPTS, SCFG))(lora, big)
    (l2, _), g2 = jax.jit(lambda t, b: contrastive_loss_and_grads(t, params, b, cfg, OPTS, SCFG))(lora, small)
    assert abs(float(l1) - float(l2)) < 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_full_finetune_gradient_flows_to_base(model):
    cfg, params, _ = model
    scfg = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, full_finetune=True)
    batch = contrastive_batch(cfg, OPTS, A=1, b=2, seed=6)
    (_, _), g = contrastive_loss_and_grads(params, None, batch, cfg, OPTS, scfg)
    assert float(jnp.abs(g["text"]["layers"]["q_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(g["vision"]["blocks"]["fc1"]["kernel"]).max()) > 0


def test_nonfinite_update_is_skipped(model):
    cfg, params, lora = model
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, tx.init(lora), jax.random.key(0), jnp.zeros((), jnp.int32)
    )
    batch = contrastive_batch(cfg, OPTS, A=1, b=2, seed=7)
    batch["cand"]["patches"][:] = np.nan
    new, m = train_step(state, batch, cfg=cfg, opts=OPTS, scfg=SCFG, tx=tx)
    assert not bool(m["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.lora), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eight_devices_equal_one():
    r = run_check(os.path.join(os.path.dirname(__file__), "mesh_check.py"), timeout=600)
    assert abs(r["loss_1"] - r["loss_8"]) <= 1e-5 * abs(r["loss_1"])
    assert r["max_param_diff"] <= 1e-6


def test_full_finetune_leaves_lm_head_untouched_and_stateless():
    import optax

    from elva_jax.train.step import split_lm_head

    cfg = tiny_cfg(tie=False)
    params = tiny_params(cfg)
    tx = optax.adamw(1e-2)
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        None,
        tx.init(split_lm_head(params)[0]),
        jax.random.key(0),
        jnp.zeros((), jnp.int32),
    )
    scfg = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, full_finetune=True)
    new, _ = train_step(state, contrastive_batch(cfg, OPTS, A=1, b=2, seed=8), cfg=cfg, opts=OPTS, scfg=scfg, tx=tx)
    np.testing.assert_array_equal(new.params["text"]["lm_head"]["kernel"], params["text"]["lm_head"]["kernel"])
    assert not np.array_equal(
        new.params["text"]["layers"]["q_proj"]["kernel"], params["text"]["layers"]["q_proj"]["kernel"]
    )
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_state < 2 * n_params  # no moments for the head
