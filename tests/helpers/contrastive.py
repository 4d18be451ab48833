"""A tiny model and random contrastive batches (text queries, image+text candidates) for train tests."""

from __future__ import annotations

import jax
import numpy as np

from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.families import parse_model_config
from elva_jax.model.inputs import build_inputs
from elva_jax.model.params import init_params
from elva_jax.model.tiny import config_dict

EMB = 500


def tiny_cfg(vocab=512, hidden=32, layers=2, heads=4, kv=2, tie=True) -> ModelConfig:
    d = config_dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=[1, 1, 2],
        tie_word_embeddings=tie,
        vision_depth=1,
        vision_embed_dim=16,
        vision_num_heads=2,
    )
    d.update(image_token_id=505, video_token_id=506, vision_start_token_id=507, vision_end_token_id=508)
    return parse_model_config(d)


def tiny_params(cfg, seed=0):
    return init_params(cfg, jax.random.key(seed), std=0.2)


def _rows(rng, n, L, with_image, cfg, img_grid=(1, 4, 4)):
    ids = np.zeros((n, L), np.int32)
    am = np.zeros((n, L), np.int32)
    grids = []
    for i in range(n):
        s = list(rng.integers(1, 400, rng.integers(3, 8)))
        if with_image:
            s = (
                [cfg.vision_start_token_id]
                + [cfg.image_token_id] * (np.prod(img_grid) // 4)
                + [cfg.vision_end_token_id]
                + s
            )
            grids.append(img_grid)
        s = s + [EMB]
        ids[i, L - len(s) :], am[i, L - len(s) :] = s, 1  # left padded
    pv = g = None
    if grids:
        g = np.array(grids)
        pv = rng.standard_normal((int(np.prod(g, 1).sum()), 1176)).astype(np.float32)
    return ids, am, pv, g


def contrastive_batch(cfg, opts: ModelOptions, *, A, b, negs=0, seed=0, L=20, rows_per_mb=None):
    """{"query": {...[A, ...]}, "cand": {...[A, ...]}}; cand rows: b positives then b*negs negatives."""
    rng = np.random.default_rng(seed)
    out = {"query": [], "cand": []}
    for _ in range(A):
        qi = build_inputs(cfg, opts, *_rows(rng, b, L, False, cfg)[:2])
        ids, am, pv, g = _rows(rng, b * (1 + negs), L, True, cfg)
        R = rows_per_mb or b * (1 + negs)
        ci = build_inputs(cfg, opts, ids, am, pv, g, rows=R, row_len=16)
        out["query"].append(qi)
        out["cand"].append(ci)
    return {k: jax.tree.map(lambda *xs: np.stack(xs), *v) for k, v in out.items()}
