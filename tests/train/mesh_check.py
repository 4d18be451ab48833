"""Run in a subprocess with 8 fake CPU devices: the same train step on a 1-device and an 8-device mesh.

Prints JSON with both losses and the max difference of the updated LoRA params.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers.contrastive import EMB, contrastive_batch, tiny_cfg, tiny_params  # noqa: E402

from elva_jax.contrastive.step import StepConfig, TrainState, batch_shardings, train_step  # noqa: E402
from elva_jax.model.config import ModelOptions  # noqa: E402
from elva_jax.model.lora import LoraConfig, init_lora, lora_axes  # noqa: E402
from elva_jax.model.params import logical_axes  # noqa: E402
from elva_jax.parallel.sharding import make_mesh, tree_shardings  # noqa: E402
from elva_jax.runtime.optim import OptimConfig, make_optimizer  # noqa: E402


def run(mesh_shape, devices, dropout=0.0):
    cfg = tiny_cfg()
    opts = ModelOptions(matmul_precision="highest")
    lcfg = LoraConfig(rank=4, alpha=8)
    scfg = StepConfig(tau=0.05, embedding="eol", emb_token_id=EMB, lora_scale=lcfg.scale, lora_dropout=dropout)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    mesh = make_mesh(*mesh_shape, devices=devices)
    params = tiny_params(cfg)
    lora = init_lora(cfg, lcfg, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B so every path carries gradient
    p_sh = tree_shardings(logical_axes(cfg), params, mesh)
    l_sh = tree_shardings(lora_axes(cfg, lcfg), lora, mesh)
    params, lora = jax.device_put(params, p_sh), jax.device_put(lora, l_sh)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, tx.init(lora), jax.random.key(0), jnp.zeros((), jnp.int32)
    )
    batch = contrastive_batch(cfg, opts, A=1, b=8, negs=1, seed=3)
    batch = jax.device_put(batch, batch_shardings(batch, mesh))
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, opts=opts, scfg=scfg, tx=tx))
    new, m = step(state, batch)
    return float(m["loss"]), jax.tree.map(np.asarray, new.lora)


if __name__ == "__main__":
    devs = jax.devices()
    assert len(devs) == 8, devs
    l1, p1 = run((1, 1, 1), devs[:1])
    l8, p8 = run((2, 2, 2), devs)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    # LoRA dropout on the mesh draws the one-device masks (threefry is partitionable), so the step agrees too
    d1, q1 = run((1, 1, 1), devs[:1], dropout=0.2)
    d8, q8 = run((2, 2, 2), devs, dropout=0.2)
    ddiff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q8)))
    out = {"loss_1": l1, "loss_8": l8, "max_param_diff": diff, "drop_loss_1": d1, "drop_loss_8": d8}
    print(json.dumps({**out, "drop_max_param_diff": ddiff}))
    sys.exit(0)
