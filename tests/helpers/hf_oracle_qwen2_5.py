"""The PyTorch oracle for Qwen2.5-VL: tiny random transformers `Qwen2_5_VLForConditionalGeneration` models.

Batches, forward outputs and errors come from `helpers.hf_oracle` (same token ids, 14-pixel patches
with temporal size 2, merge size 2). The default vision tower has 3 blocks, full attention in block 1
only, and 56-pixel windows = 2 x 2 merge units = 4 x 4 patches: an image grid (1, 8, 12) holds 2 x 3
windows, (1, 6, 10) 2 x 3 windows of which the last row and column are partial.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.hf_oracle import IMG, VE, VID, VS, V

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_config(
    *,
    layers=2,
    hidden=64,
    heads=4,
    kv_heads=2,
    inter=96,
    section=(2, 3, 3),
    tie=False,
    vis_depth=3,
    vis_dim=32,
    vis_heads=2,
    vis_inter=48,
    window=56,
    fullatt=(1,),
    theta=1e4,
    vocab=V,
):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
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
            window_size=window,
            fullatt_block_indexes=list(fullatt),
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )


def make_hf_model(seed=0, **kw):
    """A random transformers Qwen2.5-VL in eval mode, weights scaled up so errors are not hidden by tiny
    values (norm scales 1 + 0.2 N(0, 1), biases 0.2 N(0, 1), weights N(0, 1 / fan_in))."""
    torch.manual_seed(seed)
    m = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1] if p.ndim == 2 else np.prod(p.shape[1:])))
    return m


def hf_image_features(model, pv, grid):
    """transformers' merged visual tokens [n, D] (all images, in order) as numpy fp32."""
    with torch.no_grad():
        out = model.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid))
    return out.pooler_output.float().numpy()
