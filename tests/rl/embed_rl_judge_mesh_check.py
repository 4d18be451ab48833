"""Subprocess with 8 fake CPU devices: one Embed-RL step with the judge (PRM) and a fully fine-tuned
reasoner on a (2, 2, 2) mesh replaying the one-device step's samples, vs that one-device step.
Prints one JSON line."""

from __future__ import annotations

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from helpers.embed_rl_setup import PAIRS, make_embed_rl  # noqa: E402

from elva_jax.parallel.sharding import make_mesh  # noqa: E402

KEYS = ("reward", "orm", "prm", "prm_acc", "prm_unparsable", "loss", "kl_mean", "grad_norm", "tokens_sampled")


def host(tree):
    return [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(tree)]


def main():
    assert jax.device_count() == 8
    tr1, st1, _ = make_embed_rl(judge=True, full_finetune=True)
    pol0 = host(st1.lora)
    st1, m1 = tr1.step(st1, PAIRS)
    mesh = make_mesh(2, 2, 2, devices=jax.devices())
    tr8, st8, _ = make_embed_rl(mesh=mesh, judge=True, full_finetune=True)
    ref0, judge0 = host(st8.params), host(tr8.judge.params)
    st8, m8 = tr8.step(st8, PAIRS, samples=tr1.last_samples)
    p1, p8 = host(st1.lora), host(st8.lora)
    out = {
        "devices": jax.device_count(),
        "mesh": [int(v) for v in mesh.shape.values()],
        "single": {k: float(m1[k]) for k in KEYS},
        "sharded": {k: float(m8[k]) for k in KEYS},
        "same_texts": tr1.last_texts == tr8.last_texts,
        "same_answers": tr1.judge.last_answers == tr8.judge.last_answers,
        "same_prompts": [p.rendered for p in tr1.judge.last_prompts] == [p.rendered for p in tr8.judge.last_prompts],
        "policy_moved": max(float(np.abs(a - b).max()) for a, b in zip(p1, pol0)),
        "policy_diff": max(float(np.abs(a - b).max()) for a, b in zip(p1, p8)),
        "reference_unchanged": all(np.array_equal(a, b) for a, b in zip(ref0, host(st8.params))),
        "judge_unchanged": all(np.array_equal(a, b) for a, b in zip(judge0, host(tr8.judge.params))),
        "judge_shardings": sorted({str(x.sharding.spec) for x in jax.tree.leaves(tr8.judge.params)})[:6],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
