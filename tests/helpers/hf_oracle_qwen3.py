"""The PyTorch oracle for Qwen3-VL: tiny random transformers Qwen3-VL models, batches, and their outputs."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import hf_oracle
from helpers.hf_oracle import IMG, VE, VID, VS, V

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PATCH_DIM = 3 * 2 * 16 * 16  # in_channels x temporal_patch_size x patch_size^2


def hf_config(
    *,
    layers=3,
    hidden=64,
    heads=4,
    kv_heads=2,
    head_dim=20,
    inter=96,
    section=(4, 3, 3),
    tie=False,
    vis_depth=3,
    vis_dim=32,
    vis_heads=2,
    vis_inter=48,
    n_pos=16,
    deepstack=(0, 1),
    theta=1e4,
    attention_bias=False,
    vocab=V,
):
    return transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=1e-6,
            attention_bias=attention_bias,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": theta,
                "mrope_section": list(section),
                "mrope_interleaved": True,
            },
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=vis_depth,
            hidden_size=vis_dim,
            intermediate_size=vis_inter,
            num_heads=vis_heads,
            out_hidden_size=hidden,
            num_position_embeddings=n_pos,
            deepstack_visual_indexes=list(deepstack),
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )


def make_hf_model(seed=0, **kw):
    """A random transformers Qwen3-VL in eval mode, weights scaled up so errors are not hidden by tiny values."""
    torch.manual_seed(seed)
    m = transformers.Qwen3VLForConditionalGeneration(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            elif "pos_embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1] if p.ndim == 2 else np.prod(p.shape[1:])))
    return m


def make_batch(rows, pad_side="left", rng=None, n_text=(4, 12)):
    """`hf_oracle.make_batch` (same tokens and layout) with Qwen3-VL's 16-pixel patch rows."""
    rng = rng or np.random.default_rng(0)
    ids, am, pv, g = hf_oracle.make_batch(rows, pad_side, rng, n_text)
    if pv is not None:
        pv = rng.standard_normal((len(pv), PATCH_DIM)).astype(np.float32)
    return ids, am, pv, g


def hf_vision(model, pv, grid):
    """transformers' vision tower: (merged features [n, D], DeepStack features [k, n, D]) as numpy."""
    with torch.no_grad():
        out = model.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid), return_dict=True)
    deep = np.stack([f.float().numpy() for f in out.deepstack_features]) if out.deepstack_features else None
    return out.pooler_output.float().numpy(), deep
