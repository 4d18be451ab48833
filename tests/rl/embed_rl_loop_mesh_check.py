"""Subprocess with 8 fake CPU devices: one Embed-RL step (reasoner re-forward, frozen-embedder rewards,
GRPO update) on a (2, 2, 2) mesh replaying the one-device step's samples, vs that one-device step.
Prints one JSON line."""

from __future__ import annotations

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from helpers.embed_rl_setup import PAIRS, make_embed_rl  # noqa: E402

from elva_jax.parallel.sharding import make_mesh  # noqa: E402

KEYS = ("reward", "orm", "acc", "margin", "loss", "kl_mean", "grad_norm", "tokens_sampled", "cot_len")


def host(tree):
    return [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(tree)]


def main():
    assert jax.device_count() == 8
    tr1, st1, _ = make_embed_rl()
    lora0 = host(st1.lora)
    st1, m1 = tr1.step(st1, PAIRS)
    samples = tr1.last_samples
    mesh = make_mesh(2, 2, 2, devices=jax.devices())
    tr8, st8, _ = make_embed_rl(mesh=mesh)
    emb0 = host(tr8.embedder.params)
    st8, m8 = tr8.step(st8, PAIRS, samples=samples)
    l1, l8 = host(st1.lora), host(st8.lora)
    out = {
        "devices": jax.device_count(),
        "mesh": [int(v) for v in mesh.shape.values()],
        "single": {k: float(m1[k]) for k in KEYS},
        "sharded": {k: float(m8[k]) for k in KEYS},
        "same_texts": tr1.last_texts == tr8.last_texts,
        "emb_diff": float(np.abs(np.asarray(tr1.last_embeddings) - np.asarray(tr8.last_embeddings)).max()),
        "lora_moved": max(float(np.abs(a - b).max()) for a, b in zip(l1, lora0)),
        "lora_diff": max(float(np.abs(a - b).max()) for a, b in zip(l1, l8)),
        "embedder_unchanged": all(np.array_equal(a, b) for a, b in zip(emb0, host(tr8.embedder.params))),
        "param_shardings": sorted({str(x.sharding.spec) for x in jax.tree.leaves(tr8.embedder.params)})[:6],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
