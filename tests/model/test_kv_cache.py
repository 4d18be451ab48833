"""Prefill + one-token decode steps give the same logits as the full forward (and as transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.draws import assert_greedy_equal_up_to_ties
from helpers.hf_oracle import IMG, make_batch

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.hf_checkpoint import load_params
from elva_jax.model.inputs import build_inputs

FP32 = ModelOptions(matmul_precision="highest")


@pytest.mark.parametrize("rows", [[[], []], [[(1, 4, 6)], [], [(1, 2, 2), (1, 2, 4)]]], ids=["text", "images"])
@pytest.mark.parametrize("mode", ["mrope", "1d"])
def test_cached_decode_equals_full_forward(hf_factory, rows, mode):
    _, d = hf_factory()
    cfg, params = load_params(d)
    opts = ModelOptions(matmul_precision="highest", position_mode=mode)
    ids, am, pv, g = make_batch(rows, "left", np.random.default_rng(11))
    B, P = ids.shape
    new = np.random.default_rng(1).integers(4, 290, (B, 5))
    # full forward over prompt + continuation
    full_ids = np.concatenate([ids, new], 1)
    full_am = np.concatenate([am, np.ones_like(new)], 1)
    full = backbone.forward(params, build_inputs(cfg, opts, full_ids, full_am, pv, g), cfg, opts, with_logits=True)
    # prefill the prompt into a longer cache, then feed the continuation one token at a time
    cache = backbone.init_cache(cfg, B, P + 8, dtype=jnp.float32)
    out, cache = jax.jit(lambda p, x, c: backbone.prefill(p, x, c, cfg, opts))(
        params, build_inputs(cfg, opts, ids, am, pv, g), cache
    )
    m = am.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[m], np.asarray(full.logits)[:, :P][m], rtol=1e-5, atol=1e-5)
    step = jax.jit(lambda p, t, c: backbone.decode_step(p, t, c, cfg, opts))
    for i in range(new.shape[1]):
        h, logits, cache = step(params, jnp.asarray(new[:, i], jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full.logits)[:, P + i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(h), np.asarray(full.hidden)[:, P + i], rtol=1e-5, atol=1e-5)


def test_decode_matches_transformers_greedy(hf_factory):
    """Greedy continuation from the cache equals transformers' greedy `generate` (image prompt, left pad)."""
    torch = pytest.importorskip("torch")
    model, d = hf_factory()
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 4, 4)], [(1, 2, 2)]], "left", np.random.default_rng(13))
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(am),
            pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(g),
            mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    B, P = ids.shape
    cache = backbone.init_cache(cfg, B, P + 8, dtype=jnp.float32)
    out, cache = backbone.prefill(params, build_inputs(cfg, FP32, ids, am, pv, g), cache, cfg, FP32)
    tok = jnp.argmax(out.logits[:, -1], -1)
    got, steps = [np.asarray(tok)], [np.asarray(out.logits[:, -1])]
    for _ in range(5):
        _, logits, cache = backbone.decode_step(params, tok.astype(jnp.int32), cache, cfg, FP32)
        tok = jnp.argmax(logits, -1)
        got.append(np.asarray(tok))
        steps.append(np.asarray(logits))
    # equal, except where the top two logits are within float noise (another implementation may break
    # such a near tie the other way)
    assert_greedy_equal_up_to_ties(np.stack(got, 1), ref, np.stack(steps, 1))
