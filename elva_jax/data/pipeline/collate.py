"""Static-shape batches: encoded rows padded to a sequence bucket, their images and videos packed into a
fixed patch budget, in the layout of :func:`elva_jax.model.inputs.build_inputs`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from elva_jax.data.pipeline.config import PipelineConfig
from elva_jax.model.config import ModelConfig
from elva_jax.model.inputs import pack_images, position_ids

__all__ = ["Collate", "collate_group"]


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"row of {n} tokens exceeds the largest bucket {max(buckets)}")


def collate_group(
    micro: Sequence[Sequence[dict]],
    cfg: PipelineConfig,
    model_cfg: ModelConfig,
    budget: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """A micro-batches of encoded rows -> build_inputs-layout arrays with leading axis A, all padded to
    one sequence bucket; images, then videos (rows with ``pixel_values_videos`` / ``video_grid_thw`` /
    ``second_per_grid_ts``), packed into ``budget`` = (R, Lv) patch rows, each frame its own segment
    (arrays present even when the batch has no image, so shapes never change; ``budget=None`` omits them
    for text-only data). Equals ``build_inputs(**encoding.collate(rows), rows=R, row_len=Lv)`` per micro-batch."""
    L = _bucket(max(len(r["input_ids"]) for rows in micro for r in rows), cfg.seq_buckets)
    outs = []
    for rows in micro:
        ids = np.full((len(rows), L), cfg.pad_token_id, np.int32)
        am = np.zeros((len(rows), L), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = r["input_ids"]
            am[i, : len(r["input_ids"])] = 1
        img_rows = [r for r in rows if r["pixel_values"] is not None]
        vid_rows = [r for r in rows if r.get("pixel_values_videos") is not None]
        grids = np.concatenate([r["image_grid_thw"] for r in img_rows]) if img_rows else np.zeros((0, 3), np.int64)
        vgrids = np.concatenate([r["video_grid_thw"] for r in vid_rows]) if vid_rows else None
        out = {"input_ids": ids, "attention_mask": am}
        if budget is not None:
            # images of all rows first, then videos (the order embed_inputs scatters features in)
            pv = [r["pixel_values"] for r in img_rows] + [r["pixel_values_videos"] for r in vid_rows]
            pv = np.concatenate(pv) if pv else np.zeros((0, model_cfg.vision.patch_dim), np.float32)
            g = grids if vgrids is None else np.concatenate([grids, vgrids])
            R, Lv = budget
            out.update(pack_images(pv, g, rows=R, row_len=Lv, cfg=model_cfg))
        elif vid_rows:
            raise ValueError("video rows need a patch budget (patch_budget is None: text-only data)")
        spg = np.concatenate([r["second_per_grid_ts"] for r in vid_rows]) if vid_rows else None
        out["positions"] = position_ids(ids, am, grids if img_rows else None, model_cfg, cfg.position_mode, vgrids, spg)
        outs.append(out)
    return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


class Collate:
    """grain batch_fn: flat list of A*b encoded records -> the final batch (plus a ``_meta`` entry)."""

    def __init__(self, cfg: PipelineConfig, model_cfg: ModelConfig, kind: str):
        self.cfg, self.model_cfg, self.kind = cfg, model_cfg, kind

    def __call__(self, recs: Sequence[dict]) -> dict:
        cfg, b = self.cfg, self.cfg.batch_size
        truncated = sum(r["_stats"][0] for r in recs)
        skipped = [p for r in recs for p in r["_stats"][1]]
        if self.kind == "corpus":
            rows = [r["item"][0] for r in recs]
            batch = collate_group([rows], cfg, self.model_cfg, cfg.patch_budget)
            batch = {k: v[0] for k, v in batch.items()}
            n_img = sum(r["pixel_values"] is not None for r in rows)
            n_vid = sum(r.get("pixel_values_videos") is not None for r in rows)
        else:
            micro = [recs[a * b : (a + 1) * b] for a in range(cfg.micro_batches)]
            q = [[r["query"][0] for r in m] for m in micro]
            c = [[r["cands"][0] for r in m] + [x for r in m for x in r["cands"][1:]] for m in micro]
            batch = {
                "query": collate_group(q, cfg, self.model_cfg, cfg.patch_budget),
                "cand": collate_group(c, cfg, self.model_cfg, cfg.cand_patch_budget or cfg.patch_budget),
            }
            n_img = sum(x["pixel_values"] is not None for rows in q + c for x in rows)
            n_vid = sum(x.get("pixel_values_videos") is not None for rows in q + c for x in rows)
        batch["_meta"] = {
            "ids": [r["id"] for r in recs],
            "truncated": truncated,
            "images": n_img,
            "videos": n_vid,
            "skipped_paths": skipped,
        }
        return batch
