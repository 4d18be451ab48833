"""Subprocess with 8 fake CPU devices: Embed-RL's ORM, PRM candidates and total reward with the rollouts
sharded over a (2, 2, 2) mesh vs on one device. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # this checkout

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from elva_jax.parallel.sharding import logical_spec, make_mesh  # noqa: E402
from elva_jax.rl import embed_rl_rewards as E  # noqa: E402

K, G = 4, 4  # pairs x rollouts: 16 query and 16 positive rollouts
cfg = E.EmbedRLRewardConfig(prm_enabled=True)


def rewards(sims, pairs, flags, judge):
    o = E.orm_reward(sims, pairs, negative_temperature=cfg.negative_temperature, scale=cfg.orm_scale)
    cols, valid = E.prm_candidates(sims, pairs, pairs, num_pairs=K, hard_pairs=4)
    q = o["query"]
    total = E.total_reward(E.format_reward(flags), q["orm"], E.prm_reward(judge, q["margin"]), cfg)
    return o, jax.numpy.where(valid, cols, -1), total


def main():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-0.2, 1.0, (K * G, K * G)).astype(np.float32)
    pairs = np.repeat(np.arange(K), G).astype(np.int32)
    flags = rng.integers(0, 2, K * G).astype(bool)
    judge = rng.integers(0, 2, K * G).astype(bool)
    fn = jax.jit(rewards)
    one = jax.device_put((sims, pairs, flags, judge), jax.devices()[0])
    single = jax.device_get(fn(*one))
    mesh = make_mesh(2, 2, 2)
    rows = NamedSharding(mesh, logical_spec(("batch", None)))
    vec = NamedSharding(mesh, logical_spec(("batch",)))
    args = (jax.device_put(sims, rows), *(jax.device_put(x, vec) for x in (pairs, flags, judge)))
    out = fn(*args)
    assert len(out[2].sharding.device_set) == 8
    sharded = jax.device_get(out)
    lists = lambda t: jax.tree.map(lambda x: np.asarray(x).tolist(), t)  # noqa: E731
    print(
        json.dumps(
            {
                "devices": len(jax.devices()),
                "mesh": [int(v) for v in mesh.devices.shape],
                "sims": sims.tolist(),
                "pairs": pairs.tolist(),
                "single": lists(single[0]),
                "sharded": lists(sharded[0]),
                "single_candidates": lists(single[1]),
                "sharded_candidates": lists(sharded[1]),
                "single_total": lists(single[2]),
                "sharded_total": lists(sharded[2]),
            }
        )
    )


if __name__ == "__main__":
    main()
