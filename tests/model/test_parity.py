"""elva_jax's Qwen2-VL against transformers' PyTorch Qwen2-VL (the oracle) on tiny random checkpoints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.hf_oracle import hf_forward, make_batch, rel_err

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.embedding import last_token_embedding
from elva_jax.model.hf_checkpoint import load_params
from elva_jax.model.inputs import build_inputs
from elva_jax.model.rope import linear_position_ids

pytestmark = pytest.mark.reference
FP32 = ModelOptions(matmul_precision="highest")

SHAPES = {
    "gqa2_untied": dict(),
    "mha_tied": dict(heads=4, kv_heads=4, tie=True),
    "gqa4_3layers": dict(layers=3, hidden=96, heads=8, kv_heads=2, inter=160, section=(2, 2, 2)),
}
BATCHES = {
    "text_right": ([[], []], "right"),
    "text_left": ([[], []], "left"),
    "one_image": ([[(1, 4, 6)]], "left"),
    "multi_image_row": ([[(1, 4, 6), (1, 2, 2), (1, 6, 2)]], "right"),
    "mixed_rows_left": ([[(1, 2, 4)], [], [(1, 4, 4), (1, 2, 2)]], "left"),
}


def _jax_forward(params, cfg, opts, ids, am, pv, g, return_layers=False):
    inp = build_inputs(cfg, opts, ids, am, pv, g)
    fn = jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts, with_logits=True, return_layers=return_layers))
    return fn(params, inp)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_mrope_matches_transformers(hf_factory, shape, batch):
    model, d = hf_factory(**SHAPES[shape])
    cfg, params = load_params(d)
    rows, side = BATCHES[batch]
    ids, am, pv, g = make_batch(rows, side, np.random.default_rng(len(batch)))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    out = _jax_forward(params, cfg, FP32, ids, am, pv, g)
    m = am.astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 1e-5
    assert rel_err(out.logits, ref_logits, m) <= 1e-5
    emb_ref = ref_h[np.arange(len(ids)), np.max(np.where(m, np.arange(ids.shape[1]), -1), 1)]
    emb_ref /= np.linalg.norm(emb_ref, axis=-1, keepdims=True)
    emb = last_token_embedding(out.hidden, am)
    assert rel_err(emb, emb_ref, slice(None)) <= 1e-5


@pytest.mark.parametrize("batch", ["text_right", "mixed_rows_left"])
def test_1d_positions_match_transformers(hf_factory, batch):
    """LamRA mode: every token (images included) gets one running position; oracle = transformers given
    the same 1-D position ids on all three M-RoPE axes."""
    model, d = hf_factory()
    cfg, params = load_params(d)
    rows, side = BATCHES[batch]
    ids, am, pv, g = make_batch(rows, side, np.random.default_rng(3))
    pos = linear_position_ids(am)
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g, position_ids=pos)
    opts = ModelOptions(matmul_precision="highest", position_mode="1d")
    out = _jax_forward(params, cfg, opts, ids, am, pv, g)
    m = am.astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 1e-5
    assert rel_err(out.logits, ref_logits, m) <= 1e-5
    # and the two modes really differ when images are present
    if pv is not None:
        out_m = _jax_forward(params, cfg, FP32, ids, am, pv, g)
        assert rel_err(out_m.hidden, ref_h, m) > 1e-3


def test_per_layer_hidden_states(hf_factory):
    model, d = hf_factory(layers=3)
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 4, 4)], []], "left", np.random.default_rng(5))
    _, _, ref_layers = hf_forward(model, ids, am, pv, g)
    out = _jax_forward(params, cfg, FP32, ids, am, pv, g, return_layers=True)
    m = am.astype(bool)
    assert len(ref_layers) == out.layers.shape[0] == 3
    for i in range(3):
        assert rel_err(out.layers[i], ref_layers[i], m) <= 1e-5, f"layer {i}"


def test_bf16_close_to_fp32_reference(hf_factory):
    model, d = hf_factory()
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 4, 6)], []], "left", np.random.default_rng(7))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    opts = ModelOptions(dtype="bfloat16", param_dtype="bfloat16")
    _, params16 = load_params(d, dtype="bfloat16")
    out = _jax_forward(params16, cfg, opts, ids, am, pv, g)
    m = am.astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 2e-2
    assert rel_err(out.logits, ref_logits, m) <= 2e-2


def test_patch_budget_padding_does_not_change_results(hf_factory):
    """Images packed into padded rows (a fixed patch budget) give the same outputs as a tight packing."""
    model, d = hf_factory()
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 4, 6), (1, 2, 2)], [(1, 4, 4)]], "left", np.random.default_rng(9))
    tight = _jax_forward(params, cfg, FP32, ids, am, pv, g)
    inp = build_inputs(cfg, FP32, ids, am, pv, g, rows=3, row_len=32)
    padded = jax.jit(lambda p, x: backbone.forward(p, x, cfg, FP32))(params, inp)
    m = am.astype(bool)
    assert rel_err(padded.hidden, np.asarray(tight.hidden), m) <= 1e-6
