"""The PyTorch oracle: tiny random transformers Qwen2-VL models, batches, and their outputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, IMG, VID, VS, VE = 320, 300, 301, 302, 303


def hf_config(
    *,
    layers=2,
    hidden=64,
    heads=4,
    kv_heads=2,
    inter=96,
    section=(2, 3, 3),
    tie=False,
    vis_depth=2,
    vis_dim=32,
    vis_heads=2,
    theta=1e4,
    vocab=V,
):
    return transformers.Qwen2VLConfig(
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
        vision_config=dict(depth=vis_depth, embed_dim=vis_dim, hidden_size=hidden, num_heads=vis_heads, mlp_ratio=2),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )


def make_hf_model(seed=0, **kw):
    """A random transformers Qwen2-VL in eval mode, weights scaled up so errors are not hidden by tiny values."""
    torch.manual_seed(seed)
    m = transformers.Qwen2VLForConditionalGeneration(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1] if p.ndim == 2 else np.prod(p.shape[1:])))
    return m


def make_batch(rows, pad_side="left", rng=None, n_text=(4, 12)):
    """Build a padded batch. rows: list of lists of image grids (t, h, w) per row (empty = text only).

    Each row: random text, then per image <vision_start> <image_pad>*n <vision_end> + random text.
    Returns (input_ids, attention_mask, pixel_values or None, image_grid_thw or None).
    """
    rng = rng or np.random.default_rng(0)
    seqs, grids = [], []
    for imgs in rows:
        s = list(rng.integers(4, 290, rng.integers(*n_text)))
        for g in imgs:
            s += [VS] + [IMG] * (g[0] * g[1] * g[2] // 4) + [VE] + list(rng.integers(4, 290, rng.integers(1, 5)))
            grids.append(g)
        seqs.append(s)
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), np.int64)
    am = np.zeros((len(seqs), L), np.int64)
    for b, s in enumerate(seqs):
        if pad_side == "left":
            ids[b, L - len(s) :], am[b, L - len(s) :] = s, 1
        else:
            ids[b, : len(s)], am[b, : len(s)] = s, 1
    if not grids:
        return ids, am, None, None
    g = np.array(grids, np.int64)
    pv = rng.standard_normal((int(np.prod(g, 1).sum()), 1176)).astype(np.float32)
    return ids, am, pv, g


def hf_forward(model, ids, am, pv=None, grid=None, position_ids=None):
    """transformers' outputs: (last_hidden_state, logits, per-layer hidden states) as numpy fp32."""
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), output_hidden_states=True)
    if pv is not None:
        kw.update(
            pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
        )
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids, np.int64))
    with torch.no_grad():
        out = model(**kw)
    hs = [h.float().numpy() for h in out.hidden_states]
    return hs[-1], out.logits.float().numpy(), hs[:-1]


def rel_err(a, b, mask):
    a = np.asarray(a, np.float64)[mask]
    b = np.asarray(b, np.float64)[mask]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
