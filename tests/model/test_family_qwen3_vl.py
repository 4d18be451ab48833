"""elva_jax's dense Qwen3-VL family against transformers' `Qwen3VLForConditionalGeneration` (the oracle)
on tiny random checkpoints: config parsing and tensor names, host-side interpolation taps, the vision
tower with DeepStack, full forward (fp32 / bf16), checkpoint round trips and cached greedy decoding."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from helpers.hf_oracle import IMG, hf_forward, rel_err
from helpers.hf_oracle_qwen3 import hf_vision, make_batch, make_hf_model, torch, transformers

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions, UnsupportedArchitectureError
from elva_jax.model.families import family_of, parse_model_config, read_model_config
from elva_jax.model.hf_checkpoint import load_params, save_params
from elva_jax.model.inputs import build_inputs, pack_images
from elva_jax.model.params import iter_leaves, param_specs
from elva_jax.model.rope import mrope_cos_sin
from elva_jax.model.vision_qwen3 import pos_embed_taps

pytestmark = pytest.mark.reference
FP32 = ModelOptions(matmul_precision="highest")

SHAPES = {
    # GQA, odd head_dim 20 (sections sum to 10), 3 layers, DeepStack after vision blocks 0 and 1 (of 3),
    # a 4 x 4 position table, untied head
    "gqa_hd20_untied": dict(),
    # MHA, head_dim 12, tied head, q/k/v/o biases, a 6 x 6 table, DeepStack taps listed out of depth order
    "mha_hd12_tied": dict(
        heads=4, kv_heads=4, head_dim=12, section=(2, 2, 2), tie=True, attention_bias=True, n_pos=36, deepstack=(2, 0)
    ),
}
# text-only rows, left padding, a one-image row and a multi-image row; grids differ from the tables' sides
MIXED = [[(1, 4, 6)], [], [(1, 6, 8), (1, 2, 2), (1, 8, 4)]]


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    """build(shape) -> (torch model, checkpoint directory), cached per module."""
    cache = {}

    def build(shape):
        if shape not in cache:
            m = make_hf_model(**SHAPES[shape])
            d = tmp_path_factory.mktemp("qwen3vl")
            m.save_pretrained(d)
            cache[shape] = (m, str(d))
        return cache[shape]

    return build


def _leaves(params):
    return {"/".join(k): np.asarray(v) for k, v in iter_leaves(params)}


def _forward(params, cfg, opts, ids, am, pv, g, **kw):
    inp = build_inputs(cfg, opts, ids, am, pv, g)
    return jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts, with_logits=True, **kw))(params, inp)


# ---------------------------------------------------------------- config, names, host inputs


@pytest.mark.parametrize("shape", list(SHAPES))
def test_param_table_is_what_transformers_saves(hf_qwen3, shape):
    _, d = hf_qwen3(shape)
    cfg = read_model_config(d)
    assert cfg.model_type == "qwen3_vl" and cfg.text.qk_norm and cfg.text.mrope_interleaved
    names = set()
    for s in param_specs(cfg):
        names.update(s.hf_name.format(i=i) for i in range(s.shape[0] if s.stacked else 1))
    saved = set(safetensors.numpy.load_file(os.path.join(d, "model.safetensors")))
    if cfg.tie_word_embeddings:
        saved.discard("lm_head.weight")
    assert names == saved


def test_hub_layout_and_unsupported_configs(hf_qwen3):
    _, d = hf_qwen3("gqa_hd20_untied")
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    base = parse_model_config(c)
    # the hub's config.json: rope_scaling + rope_theta inside text_config, no vision rope_parameters
    hub = json.loads(json.dumps(c))
    rope = hub["text_config"].pop("rope_parameters")
    hub["text_config"]["rope_theta"] = rope.pop("rope_theta")
    hub["text_config"]["rope_scaling"] = rope
    hub["vision_config"].pop("rope_parameters")
    hub["vision_config"]["model_type"] = "qwen3_vl"
    got = parse_model_config(hub)
    assert got.text == base.text and got.vision == base.vision
    moe = dict(c, model_type="qwen3_vl_moe")
    with pytest.raises(UnsupportedArchitectureError, match="qwen3_vl_moe"):
        parse_model_config(moe)
    experts = json.loads(json.dumps(c))
    experts["text_config"]["num_experts"] = 8
    with pytest.raises(UnsupportedArchitectureError, match="MoE"):
        parse_model_config(experts)
    act = json.loads(json.dumps(c))
    act["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(UnsupportedArchitectureError, match="relu"):
        parse_model_config(act)
    act = json.loads(json.dumps(c))
    act["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(UnsupportedArchitectureError, match="gelu"):
        parse_model_config(act)


@pytest.mark.parametrize("side", [4, 6, 48])
def test_interpolation_taps_are_transformers_bits(side):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    grids = np.array([[1, 4, 6], [1, 2, 2], [2, 8, 4], [1, 6, 6], [1, 50, 34]], np.int64)
    ref_i, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    idx, w = pos_embed_taps(grids, 2, side)
    np.testing.assert_array_equal(idx, ref_i.numpy())
    np.testing.assert_array_equal(w.view(np.uint32), ref_w.numpy().view(np.uint32))


@pytest.mark.parametrize(("head_dim", "section"), [(20, (4, 3, 3)), (12, (2, 2, 2)), (128, (24, 20, 20))])
def test_interleaved_mrope_matches_transformers(head_dim, section):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = transformers.Qwen3VLTextConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(section)},
    )
    pos = np.random.default_rng(0).integers(0, 50, (3, 2, 7))  # an axis mix-up errs by O(1)
    ref_cos, ref_sin = Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor(pos))
    cos, sin = mrope_cos_sin(jnp.asarray(pos), head_dim, 1e4, section, interleaved=True)
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- numerics against transformers


def test_vision_tower_and_deepstack_features(hf_qwen3):
    model, d = hf_qwen3("gqa_hd20_untied")
    cfg, params = load_params(d)
    _, _, pv, g = make_batch(MIXED, "left", np.random.default_rng(3))
    ref, ref_deep = hf_vision(model, pv, g)
    # a padded patch budget: images spread over rows with padding slots after them
    inp = pack_images(pv, g, rows=3, row_len=64, cfg=cfg)
    feats, valid, deep = jax.jit(lambda p, x: family_of(cfg).vision_forward(p, x, cfg, FP32))(params["vision"], inp)
    valid = np.asarray(valid)
    assert valid.sum() == len(ref) and deep.shape[0] == 2
    err = rel_err(np.asarray(feats)[valid], ref, slice(None))
    err_deep = rel_err(np.asarray(deep)[:, valid], ref_deep, slice(None))
    print(f"vision fp32 rel err: merged {err:.2e}, deepstack {err_deep:.2e}")
    assert err <= 1e-5 and err_deep <= 1e-5


@pytest.mark.parametrize(
    ("shape", "rows", "side"),
    [
        ("gqa_hd20_untied", [[], []], "right"),
        ("gqa_hd20_untied", MIXED, "left"),
        ("mha_hd12_tied", MIXED, "left"),
    ],
    ids=["text_right", "mixed_left", "tied_mixed_left"],
)
def test_forward_matches_transformers(hf_qwen3, shape, rows, side):
    model, d = hf_qwen3(shape)
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch(rows, side, np.random.default_rng(len(rows)))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    out = _forward(params, cfg, FP32, ids, am, pv, g)
    m = am.astype(bool)
    errs = rel_err(out.hidden, ref_h, m), rel_err(out.logits, ref_logits, m)
    print(f"{shape} fp32 rel err: hidden {errs[0]:.2e}, logits {errs[1]:.2e}")
    assert max(errs) <= 1e-5


def test_bf16_unrolled_close_to_fp32_reference(hf_qwen3):
    model, d = hf_qwen3("gqa_hd20_untied")
    cfg, params16 = load_params(d, dtype="bfloat16")
    ids, am, pv, g = make_batch(MIXED, "left", np.random.default_rng(7))
    ref_h, ref_logits, _ = hf_forward(model, ids, am, pv, g)
    out = _forward(params16, cfg, ModelOptions(dtype="bfloat16", param_dtype="bfloat16", scan_unroll=3), ids, am, pv, g)
    m = am.astype(bool)
    errs = rel_err(out.hidden, ref_h, m), rel_err(out.logits, ref_logits, m)
    print(f"bf16 rel err: hidden {errs[0]:.2e}, logits {errs[1]:.2e}")
    assert max(errs) <= 2e-2


def test_remat_patch_budget_and_gradients(hf_qwen3):
    """remat and a padded patch budget give transformers' outputs, and the gradient of a loss
    on the last hidden state reaches DeepStack mergers, the position table and q/k norms as torch's does."""
    model, d = hf_qwen3("gqa_hd20_untied")
    cfg, params = load_params(d)
    opts = ModelOptions(matmul_precision="highest", remat=True)
    ids, am, pv, g = make_batch(MIXED, "left", np.random.default_rng(9))
    m = am.astype(bool)
    inp = build_inputs(cfg, opts, ids, am, pv, g, rows=3, row_len=64)

    def loss(p):
        h = backbone.forward(p, inp, cfg, opts).hidden
        return jnp.sum(jnp.where(m[..., None], h * h, 0.0)) / m.sum(), h

    (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    kw = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(am),
        pixel_values=torch.tensor(pv),
        image_grid_thw=torch.tensor(g),
        mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
    )
    model.zero_grad(set_to_none=True)
    h = model.model(**kw).last_hidden_state
    (torch.sum(h[torch.tensor(m)] ** 2) / m.sum()).backward()
    tg = {k: v.grad.numpy() for k, v in model.named_parameters() if v.grad is not None}
    model.zero_grad(set_to_none=True)
    assert rel_err(hidden, h.detach().numpy(), m) <= 1e-5
    gv, gt = grads["vision"], grads["text"]["layers"]
    ds, tl = "model.visual.deepstack_merger_list.", "model.language_model.layers."
    pairs = {
        "deepstack merger 1 fc2": (gv["deepstack"]["fc2"]["kernel"][1], tg[ds + "1.linear_fc2.weight"].T),
        "deepstack merger 0 norm": (gv["deepstack"]["norm"]["scale"][0], tg[ds + "0.norm.weight"]),
        "pos_embed": (gv["pos_embed"]["embedding"], tg["model.visual.pos_embed.weight"]),
        "patch_embed bias": (gv["patch_embed"]["bias"], tg["model.visual.patch_embed.proj.bias"]),
        "q_norm 1": (gt["q_norm"]["scale"][1], tg[tl + "1.self_attn.q_norm.weight"]),
        "k_norm 0": (gt["k_norm"]["scale"][0], tg[tl + "0.self_attn.k_norm.weight"]),
    }
    for name, (ours, ref) in pairs.items():
        err = rel_err(ours, ref, slice(None))
        print(f"grad {name}: rel err {err:.2e}")
        assert err <= 1e-4, name


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(hf_qwen3, tmp_path, dtype):
    _, d = hf_qwen3("gqa_hd20_untied")
    cfg, p1 = load_params(d, dtype=dtype)
    save_params(str(tmp_path / "out"), p1, cfg)
    _, p2 = load_params(str(tmp_path / "out"), dtype=dtype)
    a, b = _leaves(p1), _leaves(p2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.dtype(jnp.dtype(dtype))
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_transformers_loads_our_export(hf_qwen3, tmp_path, shape):
    """Our export, perturbed, loads into transformers with every tensor where we put it."""
    _, d = hf_qwen3(shape)
    cfg, params = load_params(d)
    params = jax.tree.map(lambda x: x * 1.5, params)
    save_params(str(tmp_path / "exp"), params, cfg)
    reloaded, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        str(tmp_path / "exp"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = {k: v.numpy() for k, v in reloaded.state_dict().items()}
    orig = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
    for k, v in orig.items():
        np.testing.assert_allclose(sd[k], 1.5 * v, rtol=1e-6, err_msg=k)
    if cfg.tie_word_embeddings:
        np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.language_model.embed_tokens.weight"])


# ---------------------------------------------------------------- KV cache


def test_cached_greedy_decode_matches_transformers_generate(hf_qwen3):
    """prefill (image prompts, DeepStack, left padding) + decode steps: transformers' greedy tokens and
    per-step logits."""
    model, d = hf_qwen3("gqa_hd20_untied")
    cfg, params = load_params(d)
    ids, am, pv, g = make_batch([[(1, 4, 4)], [(1, 2, 2), (1, 4, 6)], []], "left", np.random.default_rng(13))
    n_new = 6
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(am),
            pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(g),
            mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    ref_tokens = ref.sequences[:, ids.shape[1] :].numpy()
    ref_logits = np.stack([x.float().numpy() for x in ref.logits], 1)
    B, P = ids.shape
    cache = backbone.init_cache(cfg, B, P + n_new + 2, dtype=jnp.float32)
    prefill = jax.jit(lambda p, x, c: backbone.prefill(p, x, c, cfg, FP32, logits="last"))
    step = jax.jit(lambda p, t, c: backbone.decode_step(p, t, c, cfg, FP32))
    out, cache = prefill(params, build_inputs(cfg, FP32, ids, am, pv, g), cache)
    logits = [np.asarray(out.logits)]
    tok = jnp.argmax(out.logits, -1)
    got = [np.asarray(tok)]
    for _ in range(n_new - 1):
        _, lg, cache = step(params, tok.astype(jnp.int32), cache)
        logits.append(np.asarray(lg))
        tok = jnp.argmax(lg, -1)
        got.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(got, 1), ref_tokens)
    err = rel_err(np.stack(logits, 1), ref_logits, slice(None))
    print(f"cached decode fp32 rel err of logits: {err:.2e}")
    assert err <= 1e-5
