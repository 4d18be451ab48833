"""elva_jax's Qwen2.5-VL family against transformers' PyTorch `Qwen2_5_VLForConditionalGeneration`
(the oracle) on tiny random checkpoints: vision tower (window / full attention), full forward, bf16,
checkpoint round trips and greedy decoding from the KV cache."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from helpers.hf_oracle import IMG, hf_forward, make_batch, rel_err
from helpers.hf_oracle_qwen2_5 import hf_image_features, make_hf_model, torch, transformers

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions, UnsupportedArchitectureError
from elva_jax.model.families import family_of, parse_model_config, read_model_config
from elva_jax.model.hf_checkpoint import load_params, save_params
from elva_jax.model.inputs import build_inputs
from elva_jax.model.params import iter_leaves
from elva_jax.model.vision_qwen2_5 import window_ids

pytestmark = pytest.mark.reference
FP32 = ModelOptions(matmul_precision="highest")

SHAPES = {
    "gqa_untied": dict(),
    "mha_tied": dict(heads=4, kv_heads=4, tie=True),
}
# (1, 8, 12): 2 x 3 whole windows; (1, 6, 10): 2 x 3 windows, the last row and column partial
BATCHES = {
    "text_right": ([[], []], "right"),
    "text_left": ([[], []], "left"),
    "one_image": ([[(1, 8, 12)]], "left"),
    "multi_image_row": ([[(1, 8, 12), (1, 6, 10), (1, 2, 2)]], "right"),
    "mixed_rows_left": ([[(1, 6, 10)], [], [(1, 4, 4), (1, 2, 2)]], "left"),
}
CASES = [("gqa_untied", b) for b in BATCHES] + [("mha_tied", "text_left"), ("mha_tied", "mixed_rows_left")]


@pytest.fixture(scope="module")
def hf25(tmp_path_factory):
    """build(**kw) -> (torch model, checkpoint directory); one per config in this module."""
    cache = {}

    def build(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            m = make_hf_model(**kw)
            d = tmp_path_factory.mktemp("hf25")
            m.save_pretrained(d)
            cache[key] = (m, str(d))
        return cache[key]

    return build


def _forward(params, cfg, opts, ids, am, pv, g):
    inp = build_inputs(cfg, opts, ids, am, pv, g)
    return jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts, with_logits=True))(params, inp)


def _features(params, cfg, opts, pv, g, **pack):
    ids = np.full((1, int(np.prod(g, 1).sum()) // cfg.vision.merge_unit), IMG, np.int32)
    inp = build_inputs(cfg, opts, ids, None, pv, g, **pack)
    inp = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask", "positions")}
    fn = jax.jit(lambda p, x: family_of(cfg).vision_forward(p, x, cfg, opts)[:2])
    feats, valid = fn(params["vision"], inp)
    return np.asarray(feats)[np.asarray(valid)]


def _leaves(params):
    return {"/".join(k): np.asarray(v) for k, v in iter_leaves(params)}


def _transformers_windows(grid, cfg):
    """Window label of every patch from transformers' own `get_vision_window_index` (patch order)."""
    from transformers.vision_utils import get_vision_window_index

    v = cfg.vision
    index, cu = get_vision_window_index(torch.tensor(grid), v.spatial_merge_size, v.window_size, v.patch_size)
    unit = np.empty(len(index), np.int64)
    cu = (cu.numpy() // v.merge_unit).tolist()
    for w, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        unit[index.numpy()[lo:hi]] = w
    return np.repeat(unit, v.merge_unit)


def _same_partition(a, b):
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_window_ids_match_transformers(hf25):
    _, d = hf25()
    cfg = read_model_config(d)
    grid = np.array([[1, 8, 12], [1, 6, 10], [2, 4, 6], [1, 2, 2]])
    ours = window_ids(grid, cfg.vision)
    ref = _transformers_windows(grid, cfg)
    # transformers numbers windows globally (frames included); ours are (frame, window) within an image
    image = np.repeat(np.arange(len(grid)), np.prod(grid, 1))
    key = (image * 1000 + ours[:, 0]) * 1000 + ours[:, 1]
    assert _same_partition(key, ref)
    assert len(np.unique(ref)) == 6 + 6 + 2 * 2 + 1


@pytest.mark.parametrize(
    "vis",
    [dict(), dict(fullatt=()), dict(fullatt=(0, 2), window=112), dict(vis_depth=2, fullatt=(0, 1))],
    ids=["full_1", "all_window", "full_0_2_win112", "all_full"],
)
def test_vision_features_match_transformers(hf25, vis):
    model, d = hf25(**vis)
    cfg, params = load_params(d)
    g = np.array([[1, 8, 12], [1, 6, 10], [1, 2, 2], [1, 4, 4]])
    pv = np.random.default_rng(4).standard_normal((int(np.prod(g, 1).sum()), 1176)).astype(np.float32)
    ref = hf_image_features(model, pv, g)
    tight = _features(params, cfg, FP32, pv, g)
    assert rel_err(tight, ref, slice(None)) <= 1e-5
    # a fixed patch budget: images spread over padded rows
    padded = _features(params, cfg, FP32, pv, g, rows=3, row_len=120)
    assert rel_err(padded, ref, slice(None)) <= 1e-5


def test_window_attention_matters(hf25):
    """The windows change the result (so the parity above really tests them)."""
    import dataclasses

    _, d = hf25()
    cfg, params = load_params(d)
    g = np.array([[1, 8, 12]])
    pv = np.random.default_rng(5).standard_normal((96, 1176)).astype(np.float32)
    full = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, fullatt_block_indexes=(0, 1, 2)))
    a = _features(params, cfg, FP32, pv, g)
    b = _features(params, full, FP32, pv, g)
    assert rel_err(a, b, slice(None)) > 1e-2


@pytest.mark.parametrize("shape,batch", CASES)
def test_fp32_matches_transformers(hf25, shape, batch):
    model, d = hf25(**SHAPES[shape])
    cfg, params = load_params(d)
    assert cfg.model_type == "qwen2_5_vl"
    rows, side = BATCHES[batch]
    ids, am, pv, g = make_batch(rows, side, np.random.default_rng(len(batch)))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    out = _forward(params, cfg, FP32, ids, am, pv, g)
    m = am.astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 1e-5
    assert rel_err(out.logits, ref_logits, m) <= 1e-5


def test_bf16_close_to_fp32_reference(hf25):
    model, d = hf25()
    cfg, _ = load_params(d)
    ids, am, pv, g = make_batch([[(1, 8, 12)], [], [(1, 6, 10), (1, 2, 2)]], "left", np.random.default_rng(7))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    opts = ModelOptions(dtype="bfloat16", param_dtype="bfloat16")
    _, params16 = load_params(d, dtype="bfloat16")
    out = _forward(params16, cfg, opts, ids, am, pv, g)
    m = am.astype(bool)
    assert rel_err(out.hidden, ref_h, m) <= 2e-2
    assert rel_err(out.logits, ref_logits, m) <= 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(hf25, tmp_path, dtype):
    _, d = hf25()
    cfg, p1 = load_params(d, dtype=dtype)
    save_params(str(tmp_path / "out"), p1, cfg)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen2_5_vl"
    _, p2 = load_params(str(tmp_path / "out"), dtype=dtype)
    a, b = _leaves(p1), _leaves(p2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.dtype(jnp.dtype(dtype))
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


def test_export_names_are_transformers_names(hf25, tmp_path):
    """Our export writes exactly the tensors transformers saves, and transformers loads it."""
    model, d = hf25()
    cfg, params = load_params(d)
    # perturbed, so the check is not passed by returning the original files (x1.5 would make the
    # scaled-up model chaotic enough that fp32 noise reaches ~1e-5)
    params = jax.tree.map(lambda x: x * 1.1, params)
    save_params(str(tmp_path / "exp"), params, cfg)
    ours = safetensors.numpy.load_file(str(tmp_path / "exp" / "model.safetensors"))
    theirs = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "exp")).eval()
    ids, am, pv, g = make_batch([[(1, 6, 10)], []], "left", np.random.default_rng(2))
    _, ref_logits, _ = hf_forward(reloaded, ids, am, pv, g)
    out = _forward(params, cfg, FP32, ids, am, pv, g)
    assert rel_err(out.logits, ref_logits, am.astype(bool)) <= 1e-5


def test_module_tree_names_and_flat_config(hf25, tmp_path):
    """The 5.x module-tree names (`model.language_model.*`, `model.visual.*`) and a flat 4.x-style
    config.json (top-level text fields, `rope_scaling`, `in_chans` / `spatial_patch_size`) load the same."""
    _, d = hf25()
    tensors = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = "model.language_model." + k[6:] if k.startswith("model.") else k
        k = "model." + k if k.startswith("visual.") else k
        renamed[k] = v
    os.makedirs(tmp_path / "alt")
    safetensors.numpy.save_file(renamed, str(tmp_path / "alt" / "model.safetensors"))
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    flat = dict(c)
    text = flat.pop("text_config")
    rope = text.pop("rope_parameters")
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["model_type"] = "qwen2_5_vl"
    vis = dict(flat["vision_config"])
    vis.pop("rope_parameters")
    vis["in_chans"] = vis.pop("in_channels")
    vis["spatial_patch_size"] = vis.pop("patch_size")
    vis["model_type"] = "qwen2_5_vl"  # as some 4.x hub files have it
    flat["vision_config"] = vis
    with open(tmp_path / "alt" / "config.json", "w") as f:
        json.dump(flat, f)
    cfg_a, a = load_params(d)
    cfg_b, b = load_params(str(tmp_path / "alt"))
    assert cfg_a.text == cfg_b.text and cfg_a.vision == cfg_b.vision
    for k, v in _leaves(a).items():
        np.testing.assert_array_equal(v, _leaves(b)[k], err_msg=k)
    # a file without rms_norm_eps gets transformers' Qwen2.5-VL default
    del flat["rms_norm_eps"]
    ref = transformers.Qwen2_5_VLConfig(**flat)
    assert parse_model_config(flat).text.rms_norm_eps == ref.text_config.rms_norm_eps


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda v: v.update(hidden_act="gelu"), "activation 'gelu'"),
        (lambda v: v.update(window_size=14), "window_size"),
        (lambda v: v.pop("intermediate_size"), "missing"),
    ],
    ids=["activation", "window", "missing"],
)
def test_unsupported_vision_config(hf25, edit, match):
    _, d = hf25()
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    edit(c["vision_config"])
    with pytest.raises(UnsupportedArchitectureError, match=match):
        parse_model_config(c)


def test_decode_matches_transformers_greedy(hf25):
    """Greedy continuation from the KV cache equals transformers' greedy `generate` (image prompts, left pad)."""
    model, d = hf25()
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 8, 12)], [(1, 6, 10)]], "left", np.random.default_rng(13))
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
    prefill = jax.jit(lambda p, x, c: backbone.prefill(p, x, c, cfg, FP32, logits="last"))
    out, cache = prefill(params, build_inputs(cfg, FP32, ids, am, pv, g), cache)
    step = jax.jit(lambda p, t, c: backbone.decode_step(p, t, c, cfg, FP32))
    tok = jnp.argmax(out.logits, -1)
    got = [np.asarray(tok)]
    for _ in range(5):
        _, logits, cache = step(params, tok.astype(jnp.int32), cache)
        tok = jnp.argmax(logits, -1)
        got.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(got, 1), ref)
