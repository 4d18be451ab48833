"""Contrastive train step: InfoNCE against numpy, exact accumulation, 8 devices vs 1, non-finite skip."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params
from helpers.device_check import run_check

from elva_jax.contrastive.step import StepConfig, TrainState, contrastive_loss_and_grads, train_step
from elva_jax.model.config import ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.retrieval.losses import info_nce
from elva_jax.runtime.optim import OptimConfig, make_optimizer

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


def test_nan_learning_rate_is_skipped_with_finite_gradients(model):
    """Finite loss and gradients but a NaN learning rate: the update is non-finite, so it is skipped."""
    import optax

    cfg, params, lora = model
    tx = optax.adamw(float("nan"))
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, tx.init(lora), jax.random.key(0), jnp.zeros((), jnp.int32)
    )
    new, m = train_step(state, contrastive_batch(cfg, OPTS, A=1, b=2, seed=7), cfg=cfg, opts=OPTS, scfg=SCFG, tx=tx)
    assert np.isfinite(float(m["grad_norm"])) and not bool(m["finite"]) and int(new.skipped) == 1
    for a, b in zip(jax.tree.leaves(new.lora), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eight_devices_equal_one():
    r = run_check(os.path.join(os.path.dirname(__file__), "mesh_check.py"), timeout=600)
    assert abs(r["loss_1"] - r["loss_8"]) <= 1e-5 * abs(r["loss_1"])
    assert r["max_param_diff"] <= 1e-6
    # with LoRA dropout: the same masks on the mesh, and dropout changed the step
    assert abs(r["drop_loss_1"] - r["drop_loss_8"]) <= 1e-5 * abs(r["drop_loss_1"])
    assert r["drop_max_param_diff"] <= 1e-6 and r["drop_loss_1"] != r["loss_1"]


def test_full_finetune_leaves_lm_head_untouched_and_stateless():
    import optax

    from elva_jax.contrastive.step import split_lm_head

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


def test_instruct_last_step_on_a_pipeline_batch(tmp_path):
    """train.embedding=instruct_last: the run's pipeline encodes Qwen3-VL-Embedding prompts (instruction as
    the system turn, candidates with data.default_instruction, right padded) and the step's loss is InfoNCE
    over the L2-normalised hidden states of each row's last real token (read off by hand here)."""
    from elva_jax import configlib
    from elva_jax.contrastive.stage import train_encoder, train_template
    from elva_jax.data.benchmarks.multigrain.generator import generate
    from elva_jax.data.pipeline.config import PipelineConfig
    from elva_jax.data.pipeline.iterator import make_pipeline
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model import backbone
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config
    from elva_jax.runtime.run_data import build_records
    from elva_jax.schema import RunConfig

    generate(tmp_path / "data", seed=0, n_train=2, n_test=1)
    cfg = configlib.load(
        RunConfig, None, ["train.embedding=instruct_last", "data.kind=bundled", f"data.root={tmp_path / 'data'}"]
    )
    assert train_template(cfg) == "instruct_last"
    assert train_template(configlib.load(RunConfig, None, ["train.embedding=last"])) == "eol"
    mcfg = preset_config("tiny_qwen3_vl")
    params = init_params(mcfg, jax.random.key(0))
    tok = Tokenizer.from_dir(geometry=mcfg.vision.geometry)
    every = build_records(cfg, str(tmp_path / "data"))
    records = [next(r for r in every if r["query"]["image"]), next(r for r in every if not r["query"]["image"])]
    pcfg = PipelineConfig(
        batch_size=2,
        seq_buckets=(96, 192),
        patch_budget=(2, 64),
        shuffle=False,
        process_index=0,
        process_count=1,
        geometry=mcfg.vision.geometry,
    )
    batch = next(make_pipeline(records, train_encoder(cfg, tok), mcfg, pcfg))
    q, c = batch["query"], batch["cand"]
    for group, rows in ((q, [r["query"] for r in records]), (c, [r["cands"][0] for r in records])):
        for ids, am, side in zip(group["input_ids"][0], group["attention_mask"][0], rows):
            n = int(am.sum())
            assert am[:n].all() and not am[n:].any()  # right padded
            text = tok.decode(ids[:n])
            system = side["instruction"] or "Represent the user's input."
            assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
            assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<emb>" not in text
    assert records[0]["query"]["instruction"] and records[0]["cands"][0]["instruction"] is None

    fwd = jax.jit(lambda p, x: backbone.forward(p, x, mcfg, OPTS).hidden)

    def by_hand(inputs):
        mb = jax.tree.map(lambda x: x[0], inputs)
        h = np.asarray(fwd(params, mb))
        last = np.asarray(mb["attention_mask"]).sum(1) - 1
        e = h[np.arange(len(last)), last]
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    want, _ = info_nce(jnp.asarray(by_hand(q)), jnp.asarray(by_hand(c)), 0.05)
    lcfg = LoraConfig(rank=2, alpha=4)
    lora = init_lora(mcfg, lcfg, jax.random.key(1))  # B = 0: the step's forward is the base model's
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, tx.init(lora), jax.random.key(0), jnp.zeros((), jnp.int32)
    )
    scfg = StepConfig(tau=0.05, embedding=cfg.train.embedding, lora_scale=lcfg.scale)
    new, m = jax.jit(lambda s, b: train_step(s, b, cfg=mcfg, opts=OPTS, scfg=scfg, tx=tx))(state, batch)
    assert bool(m["finite"]) and int(new.step) == 1
    assert abs(float(m["loss"]) - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(new.lora)) > 0
    with pytest.raises(ValueError, match="embedding must be one of"):
        StepConfig(embedding="ret")
