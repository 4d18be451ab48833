"""The PyTorch oracle for video inputs: batches mixing images and videos laid out as each family's
processor lays them out, and transformers' outputs for them (all three families).

Layout per visual item (random text before, between and after):
- image: <vision_start> <image_pad> * (t h w / 4) <vision_end>
- video, Qwen2-VL / Qwen2.5-VL: <vision_start> <video_pad> * (t h w / 4) <vision_end>
- video, Qwen3-VL: per temporal patch, a few text tokens (standing for the `<x.x seconds>` timestamp),
  then <vision_start> <video_pad> * (h w / 4) <vision_end>
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.hf_oracle import IMG, VE, VID, VS

torch = pytest.importorskip("torch")

PATCH_DIM = {"qwen2_vl": 1176, "qwen2_5_vl": 1176, "qwen3_vl": 1536}


def _text(rng, lo, hi):
    return list(rng.integers(4, 290, rng.integers(lo, hi)))


def make_video_batch(family, rows, pad_side="left", rng=None, tail=(1, 5)):
    """rows: per row a list of ("image" | "video", (t, h, w)). Returns a dict of numpy arrays in
    transformers' names: input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw, second_per_grid_ts (one per video, 0.5 .. 1.5 s), mm_token_type_ids; absent keys
    for a modality the batch lacks. `tail` bounds the text after each item."""
    rng = rng or np.random.default_rng(0)
    seqs, grids = [], {"image": [], "video": []}
    for items in rows:
        s = _text(rng, 4, 12)
        for kind, g in items:
            t, h, w = g
            if kind == "image":
                s += [VS] + [IMG] * (t * h * w // 4) + [VE]
            elif family == "qwen3_vl":
                for _ in range(t):
                    s += _text(rng, 2, 4) + [VS] + [VID] * (h * w // 4) + [VE]
            else:
                s += [VS] + [VID] * (t * h * w // 4) + [VE]
            s += _text(rng, *tail)
            grids[kind].append(g)
        seqs.append(s)
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), np.int64)
    am = np.zeros((len(seqs), L), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(L - len(s), L) if pad_side == "left" else slice(0, len(s))
        ids[b, sl], am[b, sl] = s, 1
    out = {"input_ids": ids, "attention_mask": am}
    P = PATCH_DIM[family]
    for kind, pv_key, g_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if grids[kind]:
            g = np.array(grids[kind], np.int64)
            out[g_key] = g
            out[pv_key] = rng.standard_normal((int(np.prod(g, 1).sum()), P)).astype(np.float32)
    if grids["video"]:
        out["second_per_grid_ts"] = rng.choice([0.5, 1.0, 4 / 3, 1.5], len(grids["video"])).astype(np.float32)
    out["mm_token_type_ids"] = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0)).astype(np.int64)
    return out


def jax_kwargs(batch):
    """The batch as `build_inputs` keyword arguments (after cfg, opts)."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: batch[k] for k in keys if k in batch}


def hf_kwargs(family, batch):
    kw = {k: torch.tensor(v) for k, v in batch.items()}
    if family != "qwen2_5_vl":
        kw.pop("second_per_grid_ts", None)
    return kw


def hf_video_forward(family, model, batch):
    """transformers' (last hidden state, logits) as numpy fp32."""
    with torch.no_grad():
        out = model(**hf_kwargs(family, batch), output_hidden_states=True)
    return out.hidden_states[-1].float().numpy(), out.logits.float().numpy()


def hf_rope_index(family, model, batch):
    """transformers' `get_rope_index` position ids [3, B, L] as numpy int64."""
    kw = hf_kwargs(family, batch)
    names = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    args = {k: kw.get(k) for k in names}
    if family == "qwen2_5_vl":
        args["second_per_grid_ts"] = kw.get("second_per_grid_ts")
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(**args)
    return pos.numpy()
