"""Video inputs against transformers (the oracle) for every family on tiny random checkpoints: M-RoPE
position ids (`get_rope_index`), the full forward in fp32 / bf16 with rows mixing images and videos,
several videos, left / right padding and a padded patch budget, and the KV-cache path (prefill +
decode steps against transformers' forward over the whole sequence)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_oracle, hf_oracle_qwen2_5, hf_oracle_qwen3
from helpers.hf_oracle import rel_err
from helpers.hf_oracle_video import hf_rope_index, hf_video_forward, jax_kwargs, make_video_batch

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.hf_checkpoint import load_params
from elva_jax.model.inputs import PatchBudgetError, build_inputs

pytestmark = pytest.mark.reference
FP32 = ModelOptions(matmul_precision="highest")
FAMILIES = {
    "qwen2_vl": hf_oracle.make_hf_model,
    "qwen2_5_vl": hf_oracle_qwen2_5.make_hf_model,
    "qwen3_vl": hf_oracle_qwen3.make_hf_model,
}
V, I = "video", "image"
# (rows, padding side, patch budget (rows, row_len) or None for a tight packing)
BATCHES = {
    "one_video_left": ([[(V, (2, 4, 6))]], "left", None),
    "image_then_video_right": ([[(I, (1, 4, 4)), (V, (3, 2, 4))]], "right", None),
    # images and videos interleaved across rows, a text-only row, several videos in a row, a one-frame
    # video, packed into a padded fixed budget
    "mixed_rows_budget_left": (
        [[(V, (2, 2, 2)), (I, (1, 2, 4))], [], [(I, (1, 4, 2)), (V, (3, 4, 2)), (V, (1, 2, 2))]],
        "left",
        (3, 48),
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (torch model, elva_jax cfg, params fp32, checkpoint dir), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            m = FAMILIES[family]()
            d = tmp_path_factory.mktemp(family)
            m.save_pretrained(d)
            cfg, params = load_params(str(d))
            cache[family] = (m, cfg, params, str(d))
        return cache[family]

    return get


def _batch(family, name, **kw):
    rows, side, budget = BATCHES[name]
    b = make_video_batch(family, rows, side, np.random.default_rng(len(name)), **kw)
    pack = {} if budget is None else dict(rows=budget[0], row_len=budget[1])
    return b, pack


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(BATCHES))
def test_positions_equal_get_rope_index(models, family, name):
    model, cfg, _, _ = models(family)
    b, _ = _batch(family, name)
    inp = build_inputs(cfg, FP32, b["input_ids"], b["attention_mask"], **jax_kwargs(b))
    ref = hf_rope_index(family, model, b)
    np.testing.assert_array_equal(inp["positions"], ref)


def test_qwen2_5_time_ids_scale_with_seconds(models):
    """Qwen2.5-VL's time ids are floor(t * tokens_per_second * second_per_grid_t): they change with the
    seconds per grid (and equal transformers' for a fractional value), unlike Qwen2-VL's."""
    model, cfg, _, _ = models("qwen2_5_vl")
    b, _ = _batch("qwen2_5_vl", "one_video_left")
    vid = b["input_ids"] == cfg.video_token_id
    ts = {}
    for spg in (0.5, 4 / 3):
        b["second_per_grid_ts"] = np.array([spg], np.float32)
        pos = build_inputs(cfg, FP32, b["input_ids"], b["attention_mask"], **jax_kwargs(b))["positions"]
        np.testing.assert_array_equal(pos, hf_rope_index("qwen2_5_vl", model, b))
        t = pos[0][vid]
        ts[spg] = sorted(set((t - t.min()).tolist()))
    assert ts[0.5] == [0, 2] and ts[4 / 3] == [0, 5]  # tokens_per_second 4: floor(4 * 4/3) = 5


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(BATCHES))
def test_forward_matches_transformers(models, family, name):
    model, cfg, params, _ = models(family)
    b, pack = _batch(family, name)
    ref_h, ref_logits = hf_video_forward(family, model, b)
    inp = build_inputs(cfg, FP32, b["input_ids"], b["attention_mask"], **jax_kwargs(b), **pack)
    out = jax.jit(lambda p, x: backbone.forward(p, x, cfg, FP32, with_logits=True))(params, inp)
    m = b["attention_mask"].astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 1e-5
    assert rel_err(out.logits, ref_logits, m) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_close_to_fp32_reference(models, family):
    model, cfg, _, d = models(family)
    b, pack = _batch(family, "mixed_rows_budget_left")
    ref_h, ref_logits = hf_video_forward(family, model, b)
    opts = ModelOptions(dtype="bfloat16", param_dtype="bfloat16")
    _, params16 = load_params(d, dtype="bfloat16")
    inp = build_inputs(cfg, opts, b["input_ids"], b["attention_mask"], **jax_kwargs(b), **pack)
    out = jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts, with_logits=True))(params16, inp)
    m = b["attention_mask"].astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 2e-2
    assert rel_err(out.logits, ref_logits, m) <= 2e-2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_matches_transformers(models, family):
    """Prefill a left-padded video prompt, then extend by 3 tokens in one pass and decode them one at a
    time: hidden states / logits equal transformers' forward over prompt + continuation (the prompt ends
    in enough text that the continuation's positions, max prompt position + 1 + i, are what
    `get_rope_index` gives the whole sequence)."""
    model, cfg, params, _ = models(family)
    rows = [[(V, (2, 4, 6))], [(I, (1, 2, 2)), (V, (2, 2, 4))]]
    b = make_video_batch(family, rows, "left", np.random.default_rng(5), tail=(10, 12))
    ids, am = b["input_ids"], b["attention_mask"]
    B, P = ids.shape
    new = np.random.default_rng(6).integers(4, 290, (B, 3))
    full = dict(b, input_ids=np.concatenate([ids, new], 1), attention_mask=np.concatenate([am, np.ones_like(new)], 1))
    full["mm_token_type_ids"] = np.concatenate([b["mm_token_type_ids"], np.zeros_like(new)], 1)
    ref_pos = hf_rope_index(family, model, full)
    prompt_max = np.where(am[None] > 0, ref_pos[:, :, :P], -1).max(axis=(0, 2))
    np.testing.assert_array_equal(
        ref_pos[:, :, P:], np.broadcast_to((prompt_max[:, None] + 1 + np.arange(3))[None], (3, B, 3))
    )
    ref_h, ref_logits = hf_video_forward(family, model, full)

    cache = backbone.init_cache(cfg, B, P + 4, dtype=jnp.float32)
    inp = build_inputs(cfg, FP32, ids, am, **jax_kwargs(b))
    out, cache = jax.jit(lambda p, x, c: backbone.prefill(p, x, c, cfg, FP32))(params, inp, cache)
    m = am.astype(bool)
    assert rel_err(out.logits, ref_logits[:, :P], m) <= 1e-5
    # extend: the 3 tokens in one pass after the cached prefix (teacher forcing)
    lengths = jnp.full((B,), 3, jnp.int32)
    h_ext = jax.jit(lambda p, t, c: backbone.extend(p, t, lengths, c, cfg, FP32))(
        params, jnp.asarray(new, jnp.int32), cache
    )
    assert rel_err(h_ext, ref_h[:, P:], slice(None)) <= 1e-5
    step = jax.jit(lambda p, t, c: backbone.decode_step(p, t, c, cfg, FP32))
    for i in range(new.shape[1]):
        _, logits, cache = step(params, jnp.asarray(new[:, i], jnp.int32), cache)
        assert rel_err(logits, ref_logits[:, P + i], slice(None)) <= 1e-5, f"step {i}"


def test_video_over_the_patch_budget_is_a_named_error(models):
    _, cfg, _, _ = models("qwen2_vl")
    b = make_video_batch("qwen2_vl", [[(V, (4, 4, 6))]], "left")  # 96 patches
    with pytest.raises(PatchBudgetError, match=r"visual item 0 \(grid \(4, 4, 6\)\) has 96 patches"):
        build_inputs(cfg, FP32, b["input_ids"], b["attention_mask"], **jax_kwargs(b), rows=2, row_len=64)
    with pytest.raises(ValueError, match="video_pad"):
        build_inputs(cfg, FP32, b["input_ids"], b["attention_mask"])


def test_compare_cli_takes_video_npz_keys(models, tmp_path, capsys):
    """The compare tool on an npz with video keys (Qwen2.5-VL: second_per_grid_ts reaches both sides)."""
    from elva_jax import compare

    family = "qwen2_5_vl"
    _, _, _, d = models(family)
    b, _ = _batch(family, "image_then_video_right")
    f = tmp_path / "in.npz"
    np.savez(f, **{k: v for k, v in b.items() if k != "mm_token_type_ids"})
    assert compare.main(["--hf-dir", d, "--inputs", str(f), "--tol", "1e-5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pass"] is True and res["n_videos"] == 1 and res["n_images"] == 1
    np.savez(f, **{k: v for k, v in b.items() if k not in ("mm_token_type_ids", "video_grid_thw")})
    with pytest.raises(compare.CompareInputError, match="pixel_values_videos and video_grid_thw"):
        compare.main(["--hf-dir", d, "--inputs", str(f)])
