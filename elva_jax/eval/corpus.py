"""Corpus batches of evaluation, shared by the embedder (:mod:`elva_jax.eval.embed`) and the T-CoT generator
(:mod:`elva_jax.eval.cot`): the one-pass corpus pipeline's settings, right- to left-padded rows for the
sampler, and the placement of params and batches on a mesh."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from elva_jax.data.pipeline.config import ImagePolicy, PipelineConfig
from elva_jax.model.inputs import input_axes
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import logical_spec, tree_shardings

__all__ = ["batch_devices", "corpus_pipeline_config", "left_align", "place_params", "put_batch"]


def corpus_pipeline_config(c, records: Sequence[dict], tok, opts, cfg) -> PipelineConfig:
    """The one-pass, one-host corpus pipeline of evaluation (the Embedder's and the T-CoT generator's):
    ``c`` is their config (batch size, buckets, patch rows, its ``media`` settings); a patch budget only
    when some record has an image or a video; bad images fail; the model's patch geometry."""
    has_img = any(r["item"].get("image") or r["item"].get("video") for r in records)
    return PipelineConfig(
        batch_size=c.batch_size,
        micro_batches=1,
        seq_buckets=tuple(c.seq_buckets),
        patch_budget=(c.patch_rows or c.batch_size, c.media.patch_row_len) if has_img else None,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
        image_policy=ImagePolicy("fail"),
        drop_remainder=True,
        pad_token_id=tok.pad_token_id,
        position_mode=opts.position_mode,
        geometry=cfg.vision.geometry,  # the model's patches (Qwen3-VL: 16-pixel)
        media=c.media,
    )


def batch_devices(mesh) -> int:
    """The devices a batch's rows are split over: the mesh's ("data", "fsdp") axes (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def place_params(params: dict, model_cfg, mesh=None) -> dict:
    """The params laid out on ``mesh`` by their logical axes (:mod:`elva_jax.parallel.sharding`); as they
    are without a mesh."""
    if mesh is None:
        return params
    return jax.device_put(params, tree_shardings(logical_axes(model_cfg), params, mesh))


def put_batch(batch: dict, mesh=None) -> dict:
    """Place a batch of model inputs on ``mesh`` (rows over the batch axes); as is without a mesh."""
    if mesh is None:
        return batch
    sh = {k: NamedSharding(mesh, logical_spec(input_axes(k, np.ndim(v)))) for k, v in batch.items()}
    return jax.device_put(batch, sh)


def left_align(batch: dict) -> dict:
    """Right-padded corpus batch -> left-padded (rows rolled; image order and positions unchanged)."""
    am = batch["attention_mask"]
    L = am.shape[1]
    shift = L - am.sum(axis=1)
    cols = (np.arange(L)[None, :] - shift[:, None]) % L  # out[:, j] = in[:, j - shift]
    out = dict(batch)
    out["input_ids"] = np.take_along_axis(batch["input_ids"], cols, axis=1)
    out["attention_mask"] = np.take_along_axis(am, cols, axis=1)
    out["positions"] = np.take_along_axis(batch["positions"], np.broadcast_to(cols, batch["positions"].shape), axis=2)
    return out
