"""Checkpoint import/export against transformers' own save/load, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from helpers.hf_oracle import hf_forward, make_batch, make_hf_model, rel_err, transformers

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions, UnsupportedArchitectureError
from elva_jax.model.hf_checkpoint import CheckpointError, load_params, resize_vocab, save_params
from elva_jax.model.inputs import build_inputs
from elva_jax.model.params import iter_leaves

FP32 = ModelOptions(matmul_precision="highest")


def _leaves(params):
    return {"/".join(k): np.asarray(v) for k, v in iter_leaves(params)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(hf_factory, tmp_path, dtype):
    _, d = hf_factory()
    cfg, p1 = load_params(d, dtype=dtype)
    save_params(str(tmp_path / "out"), p1, cfg)
    _, p2 = load_params(str(tmp_path / "out"), dtype=dtype)
    a, b = _leaves(p1), _leaves(p2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.dtype(jnp.dtype(dtype))
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_loads_our_export(hf_factory, tmp_path, tie):
    model, d = hf_factory(tie=tie)
    cfg, params = load_params(d)
    # perturb so the check is not passed by returning the original files
    params = jax.tree.map(lambda x: x * 1.5, params)
    save_params(str(tmp_path / "exp"), params, cfg)
    reloaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "exp")).eval()
    ids, am, pv, g = make_batch([[(1, 4, 4)], []], "left", np.random.default_rng(2))
    ref_h, ref_logits, _ = hf_forward(reloaded, ids, am, pv, g)
    out = backbone.forward(params, build_inputs(cfg, FP32, ids, am, pv, g), cfg, FP32, with_logits=True)
    m = am.astype(bool)
    assert rel_err(out.logits, ref_logits, m) <= 1e-5


def test_sharded_safetensors_import(tmp_path):
    model = make_hf_model(seed=3)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    model.save_pretrained(tmp_path / "single")
    _, a = load_params(str(tmp_path / "sharded"))
    _, b = load_params(str(tmp_path / "single"))
    for k, v in _leaves(a).items():
        np.testing.assert_array_equal(v, _leaves(b)[k], err_msg=k)
    # our own export can shard too
    cfg, _ = load_params(str(tmp_path / "single"))
    save_params(str(tmp_path / "ours"), a, cfg, max_shard_bytes=40_000)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    _, c = load_params(str(tmp_path / "ours"))
    for k, v in _leaves(a).items():
        np.testing.assert_array_equal(v, _leaves(c)[k], err_msg=k)


def test_module_tree_names_and_flat_config(hf_factory, tmp_path):
    """A state dict saved from transformers 5.x's module tree (`model.language_model.*`, `model.visual.*`)
    and a flat 4.x-style config.json (top-level text fields, `rope_scaling`) load the same params."""
    _, d = hf_factory()
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
    flat["model_type"] = "qwen2_vl"
    with open(tmp_path / "alt" / "config.json", "w") as f:
        json.dump(flat, f)
    cfg_a, a = load_params(d)
    cfg_b, b = load_params(str(tmp_path / "alt"))
    assert cfg_a.text == cfg_b.text and cfg_a.vision == cfg_b.vision
    for k, v in _leaves(a).items():
        np.testing.assert_array_equal(v, _leaves(b)[k], err_msg=k)


def _copy_with(d, tmp_path, edit):
    out = tmp_path / "bad"
    shutil.copytree(d, out)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def test_missing_tensor_is_named(hf_factory, tmp_path):
    _, d = hf_factory()
    bad = _copy_with(d, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_params(bad)


def test_wrong_shape_is_named(hf_factory, tmp_path):
    _, d = hf_factory()
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _copy_with(d, tmp_path, lambda t: t.__setitem__(key, np.zeros((3, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(3, 64\)"):
        load_params(bad)


def test_unsupported_architecture(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        load_params(str(tmp_path / "llama"))


@pytest.mark.parametrize("grow", [True, False])
def test_resize_vocab_like_transformers(hf_factory, grow):
    model, d = hf_factory()
    cfg, params = load_params(d)
    new = cfg.text.vocab_size + 3 if grow else cfg.text.vocab_size - 7
    ref = make_hf_model()  # same seed as the factory's default model
    ref.load_state_dict(model.state_dict())
    ref.resize_token_embeddings(new)
    ref_emb = ref.get_input_embeddings().weight.detach().numpy()
    ref_head = ref.lm_head.weight.detach().numpy().T
    p2, cfg2 = resize_vocab(params, cfg, new)
    assert cfg2.text.vocab_size == new
    emb, head = np.asarray(p2["text"]["embed_tokens"]["embedding"]), np.asarray(p2["text"]["lm_head"]["kernel"])
    assert emb.shape == ref_emb.shape and head.shape == ref_head.shape
    old = min(new, cfg.text.vocab_size)
    np.testing.assert_array_equal(emb[:old], ref_emb[:old])
    np.testing.assert_array_equal(head[:, :old], ref_head[:, :old])
    if grow:  # transformers samples N(mean, 1e-9 cov): the mean to ~1e-4
        np.testing.assert_allclose(emb[old:], ref_emb[old:], atol=2e-4)
        np.testing.assert_allclose(head[:, old:], ref_head[:, old:], atol=2e-4)


def test_load_onto_sharding(hf_factory):
    """Each tensor goes straight to its sharding (one device here; the mesh tests use several)."""
    _, d = hf_factory()
    dev = jax.devices()[0]
    from jax.sharding import SingleDeviceSharding

    from elva_jax.model.params import logical_axes

    cfg, ref = load_params(d)
    shardings = jax.tree.map(
        lambda _: SingleDeviceSharding(dev), logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    _, got = load_params(d, shardings=shardings, dtype=jnp.bfloat16)
    for k, v in _leaves(got).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(v, _leaves(ref)[k].astype(jnp.bfloat16), err_msg=k)
