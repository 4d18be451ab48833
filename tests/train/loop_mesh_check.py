"""Subprocess with 8 fake CPU devices: the training loop itself (state placement, checkpoints) on a mesh."""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import grain  # noqa: E402
import numpy as np  # noqa: E402
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params  # noqa: E402

from elva_jax import configlib  # noqa: E402
from elva_jax.contrastive.loop import train  # noqa: E402
from elva_jax.model.config import ModelOptions  # noqa: E402
from elva_jax.schema import RunConfig  # noqa: E402

if __name__ == "__main__":
    run_dir = sys.argv[1]
    cfg_m = tiny_cfg()
    it = iter(
        grain.MapDataset.source(np.arange(10))
        .map(lambda i: contrastive_batch(cfg_m, ModelOptions(), A=1, b=8, seed=int(i)))
        .to_iter_dataset()
    )
    cfg = configlib.load(
        RunConfig,
        None,
        [
            f"run.dir={run_dir}",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "run.checkpoint_every=1",
            "run.async_checkpoint=false",
            "lora.rank=4",
        ],
    )
    s = train(cfg, cfg_m, tiny_params(cfg_m), it, 2, emb_token_id=EMB)
    print(json.dumps({"losses": s["losses"], "end_step": s["end_step"]}))
