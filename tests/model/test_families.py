"""What every backbone family must support, run on each family's tiny preset (small vocabulary):
checkpoint round trip with a vocabulary resize, LoRA on every target, the RL sampler against the
teacher-forced pass, and the compare tool against transformers. Family-specific numerics (vision
towers, DeepStack, window attention) are checked against transformers in test_family_*.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elva_jax.model import backbone
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.families import parse_model_config
from elva_jax.model.hf_checkpoint import load_params, resize_vocab, save_params
from elva_jax.model.inputs import build_inputs
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.model.params import init_params, iter_leaves
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.model.tiny import preset_config_dict

FAMILIES = ["tiny", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]
FP32 = ModelOptions(matmul_precision="highest")
V, IMG, VS, VE, RET, EOS, PAD = 512, 500, 501, 502, 503, 504, 0


def small_vocab(preset: str) -> ModelConfig:
    d = preset_config_dict(preset)
    d["text_config"].update(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    d.update(image_token_id=IMG, video_token_id=505, vision_start_token_id=VS, vision_end_token_id=VE)
    return parse_model_config(d, source=preset)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    cfg = small_vocab(request.param)
    return request.param, cfg, init_params(cfg, jax.random.key(0), std=0.2)


def _prompt(cfg, rng, n_img=1, left_pad=2):
    """One left-padded row with an image of a 2x2-merged-token grid, and a text-only row."""
    m = cfg.vision.spatial_merge_size
    gh, gw = 2 * m, 3 * m
    n = gh * gw // m**2
    img = [VS] + [IMG] * n + [VE]
    a = np.concatenate([rng.integers(1, 400, 3), img, rng.integers(1, 400, 4)])
    b = np.concatenate([np.zeros(left_pad, int), rng.integers(1, 400, len(a) - left_pad)])
    ids = np.stack([a, b]).astype(np.int32)
    am = (np.arange(len(a))[None] >= np.array([[0], [left_pad]])).astype(np.int32)
    pv = rng.standard_normal((gh * gw, cfg.vision.patch_dim)).astype(np.float32)
    return ids, am, pv, np.array([[1, gh, gw]])


def test_checkpoint_round_trip_with_vocab_resize(family, tmp_path):
    name, cfg, params = family
    save_params(str(tmp_path / "a"), params, cfg)
    cfg2, p2 = load_params(str(tmp_path / "a"))
    assert cfg2.model_type == cfg.model_type
    for (path, x), (_, y) in zip(iter_leaves(params), iter_leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg="/".join(path))
    big, cfg3 = resize_vocab(p2, cfg2, V + 16)
    save_params(str(tmp_path / "b"), big, cfg3)
    cfg4, p4 = load_params(str(tmp_path / "b"))
    assert cfg4.text.vocab_size == V + 16
    emb = np.asarray(p4["text"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(emb[:V], np.asarray(params["text"]["embed_tokens"]["embedding"]))
    np.testing.assert_allclose(emb[V:], np.broadcast_to(emb[:V].mean(0), (16, emb.shape[1])), rtol=1e-5, atol=1e-7)


def test_export_refuses_non_finite_tensors(family, tmp_path):
    from elva_jax.model.hf_checkpoint import CheckpointError

    name, cfg, params = family
    bad = jax.tree.map(lambda x: x, params)
    bad["text"]["norm"]["scale"] = bad["text"]["norm"]["scale"].at[3].set(jnp.nan)
    with pytest.raises(CheckpointError, match="text/norm/scale .* 1 non-finite"):
        save_params(str(tmp_path / "nan"), bad, cfg)
    assert not (tmp_path / "nan").exists()


def test_lora_reaches_every_target_and_changes_the_output(family):
    name, cfg, params = family
    ids, am, pv, g = _prompt(cfg, np.random.default_rng(1))
    x = build_inputs(cfg, FP32, ids, am, pv, g)
    lcfg = LoraConfig(rank=2, alpha=4)
    lora = jax.tree.map(lambda a: a + 0.05, init_lora(cfg, lcfg, jax.random.key(3)))

    def loss(lo):
        h = backbone.forward(params, x, cfg, FP32, lora=lo, lora_scale=lcfg.scale).hidden
        return jnp.sum(jnp.where(am[..., None] > 0, h, 0.0) ** 2)

    fwd = jax.jit(lambda lo: backbone.forward(params, x, cfg, FP32, lora=lo, lora_scale=lcfg.scale).hidden)
    zero = jax.tree.map(jnp.zeros_like, lora)
    assert float(jnp.abs(fwd(lora) - fwd(zero)).max()) > 1e-3
    grads = jax.jit(jax.grad(loss))(lora)
    for path, gr in iter_leaves(grads):
        assert float(jnp.abs(gr).max()) > 0, "/".join(path)


def test_sampler_log_probs_equal_the_teacher_forced_pass(family):
    """The RL sampler (prefill + decode over the KV cache, image prompts, left padding) and the
    teacher-forced re-forward give the same log-probs for the sampled tokens."""
    from elva_jax.rl.rollout import RLConfig, teacher_forced_shared

    name, cfg, params = family
    ids, am, pv, g = _prompt(cfg, np.random.default_rng(2))
    x = build_inputs(cfg, FP32, ids, am, pv, g)
    G = 3
    scfg = SamplerConfig(max_new_tokens=5, temperature=1.0, cache_dtype="float32")
    out = jax.jit(
        lambda p, x: generate(
            p, x, jax.random.key(5), cfg, FP32, scfg, num_samples=G, stop_ids=(RET, EOS), ret_id=RET, pad_id=PAD
        )
    )(params, x)
    assert (np.asarray(out.tokens)[np.arange(len(out.lengths)), np.asarray(out.lengths) - 1] == RET).all()
    rcfg = RLConfig(group_size=G, temperature=1.0)
    logp, emb = jax.jit(lambda p, x, t, n: teacher_forced_shared(p, None, 1.0, x, t, n, G, cfg, FP32, rcfg))(
        params, x, out.tokens, out.lengths
    )
    mask = np.asarray(out.mask)
    assert mask.sum() > 0
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(out.logps)[mask], atol=1e-4)
    assert np.isfinite(np.asarray(emb)).all() and np.asarray(emb).shape == (2 * G, cfg.text.hidden_size)


@pytest.mark.reference
def test_compare_tool_passes_on_the_family(family, tmp_path, capsys):
    """`python -m elva_jax.compare` on the family's checkpoint (random inputs with images, left padding)."""
    pytest.importorskip("torch")
    from elva_jax import compare

    name, cfg, params = family
    save_params(str(tmp_path / "ck"), params, cfg)
    assert compare.main(["--hf-dir", str(tmp_path / "ck"), "--per-layer", "--tol", "1e-5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pass"] and res["n_images"] > 0 and len(res["per_layer"]) == cfg.text.num_layers
