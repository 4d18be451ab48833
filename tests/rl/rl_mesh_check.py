"""Subprocess with 8 fake CPU devices: the RL loss and LoRA gradients on a (2,2,2) mesh vs one device;
two whole RL trainer steps (re-forward, rewards, update) on that mesh replaying the one-device run's
samples; and the mesh's own sampling against the one-device samples (agreement up to near-ties)."""

from __future__ import annotations

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from helpers.contrastive import tiny_cfg, tiny_params  # noqa: E402
from helpers.draws import first_differences  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from elva_jax.model.config import ModelOptions  # noqa: E402
from elva_jax.model.inputs import build_inputs, input_axes  # noqa: E402
from elva_jax.model.lora import LoraConfig, init_lora, lora_axes  # noqa: E402
from elva_jax.model.params import logical_axes  # noqa: E402
from elva_jax.parallel.sharding import logical_spec, make_mesh, tree_shardings  # noqa: E402
from elva_jax.rl.rewards import RewardConfig  # noqa: E402
from elva_jax.rl.rollout import RLConfig, rl_loss  # noqa: E402

I, G, S, P, T = 2, 4, 2, 10, 5
D = I * S  # distinct prompts
N = D * G  # sampled rows, prompt-major


def make_batch(cfg, opts):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, T + 1, N)
    gen = rng.integers(1, 400, (N, T)).astype(np.int32)
    gen[np.arange(N), lengths - 1] = 501  # [RET]
    mask = np.arange(T)[None] < lengths[:, None]
    gen = np.where(mask, gen, 0)
    ids = rng.integers(1, 400, (D, P)).astype(np.int32)
    am = np.ones((D, P), np.int32)
    am[0, :3] = 0  # one left-padded prompt
    return {
        "prompts": build_inputs(cfg, opts, ids, am),
        "gen_tokens": gen,
        "gen_lengths": lengths.astype(np.int32),
        "mask": mask,
        "old_logp": rng.normal(-5, 0.3, (N, T)).astype(np.float32),
        "ref_logp": rng.normal(-5, 0.3, (N, T)).astype(np.float32),
        "adv": rng.normal(0, 1, N).astype(np.float32),
        "valid": np.ones((I, S - 1), bool),
    }


def shardings(batch, mesh):
    row = NamedSharding(mesh, logical_spec(("batch", None)))
    out = {
        k: (row if np.ndim(v) == 2 and k != "valid" else NamedSharding(mesh, logical_spec(("batch",))))
        for k, v in batch.items()
        if k not in ("prompts", "valid")
    }
    out["valid"] = NamedSharding(mesh, logical_spec((None, None)))
    out["prompts"] = {
        k: NamedSharding(mesh, logical_spec(input_axes(k, np.ndim(v)))) for k, v in batch["prompts"].items()
    }
    return out


def run(mesh_shape, devices):
    cfg, opts = tiny_cfg(), ModelOptions(matmul_precision="highest")
    rcfg = RLConfig(group_size=G, beta=0.2, aux_soft_rank_weight=0.5, loss_type="grpo")
    lcfg = LoraConfig(rank=4, alpha=8)
    mesh = make_mesh(*mesh_shape, devices=devices)
    params = jax.device_put(tiny_params(cfg), tree_shardings(logical_axes(cfg), tiny_params(cfg), mesh))
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(cfg, lcfg, jax.random.key(1)))
    lora = jax.device_put(lora, tree_shardings(lora_axes(cfg, lcfg), lora, mesh))
    batch = make_batch(cfg, opts)
    batch = jax.device_put(batch, shardings(batch, mesh))
    fn = jax.jit(
        jax.value_and_grad(
            lambda lo, p, b: rl_loss(
                lo,
                p,
                b,
                cfg=cfg,
                opts=opts,
                rcfg=rcfg,
                reward_cfg=RewardConfig(),
                lora_scale=lcfg.scale,
                shape=(I, G, S),
            )[0]
        )
    )
    loss, g = fn(lora, params, batch)
    return float(loss), [np.asarray(x) for x in jax.tree.leaves(g)]


def trainer_steps(tr, root, replay=None):
    """Two RL trainer steps of ``tr`` from its initial state (fp32 KV cache); ``replay``: each step's
    samples to use instead of sampling. Returns (metrics of each step, samples of each step, LoRA after)."""
    from helpers.rl_setup import fresh_state, instances

    insts = instances(root)[:2]
    st = fresh_state(tr)
    ms, samples = [], []
    for i in range(2):
        st, m = tr.step(st, insts, samples=None if replay is None else replay[i])
        ms.append(m)
        samples.append(tr.last_samples)
    return ms, samples, [np.asarray(x) for x in jax.tree.leaves(st.lora)]


def sampling_agreement(tr8, tr1, root, ref_samples):
    """The first step's own sampling on the mesh trainer ``tr8`` against the one-device samples.

    Both draw with the same key, so each row uses the same uniform u and the same inverse-CDF rule over
    the vocabulary in id order. Logits that differ in the last bits (another reduction order) move the
    CDF by ~1e-7, so a row can only change where u sits that close to a boundary between two tokens:
    at its first differing position the two tokens are then neighbours in id order. A real mesh bug
    (wrong rows, wrong logits) picks unrelated tokens. Also: the mesh sampler's log-probs of its own
    tokens equal the one-device (``tr1``) teacher-forced log-probs of the same tokens.
    """
    from helpers.rl_setup import fresh_state, instances

    insts = instances(root)[:2]
    out, _, (_, G, _), _ = tr8.rollouts(fresh_state(tr8), insts)
    st1 = fresh_state(tr1)
    _, _, _, chunks1 = tr1.rollouts(st1, insts, samples=out)
    tf_logp = np.asarray(tr1.reforward(st1, chunks1, out.tokens, out.lengths, G)[0])
    a, b = np.asarray(ref_samples.tokens), np.asarray(out.tokens)
    m = np.asarray(ref_samples.mask) | np.asarray(out.mask)
    rows_equal = (a == b).all(1)
    neighbours, far = 0, []
    for r, t in first_differences(a, b):
        if abs(int(a[r, t]) - int(b[r, t])) == 1:
            neighbours += 1
        else:
            far.append((r, t, int(a[r, t]), int(b[r, t])))
    mask8 = np.asarray(out.mask)
    return {
        "rows": len(a),
        "rows_equal": int(rows_equal.sum()),
        "token_agreement": float(((a == b) & m).sum() / max(1, m.sum())),
        "diverged_at_neighbour": neighbours,
        "diverged_far": far,
        "sampler_vs_1dev_logp": float(np.abs(tf_logp - np.asarray(out.logps))[mask8].max()),
    }


if __name__ == "__main__":
    import sys

    devs = jax.devices()
    l1, g1 = run((1, 1, 1), devs[:1])
    l8, g8 = run((2, 2, 2), devs)
    scale = max(float(np.abs(a).max()) for a in g1)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(g1, g8))
    mesh = make_mesh(2, 2, 2, devices=devs)
    from helpers.rl_setup import make_trainer

    tr1, _ = make_trainer(cache_dtype="float32")
    tr8, _ = make_trainer(mesh=mesh, cache_dtype="float32")
    m1, s1, lora1 = trainer_steps(tr1, sys.argv[1])
    # the mesh step given the one-device run's samples: a function of the same inputs
    m8, _, lora8 = trainer_steps(tr8, sys.argv[1], replay=s1)
    keys = ("reward", "loss", "kl_mean", "summary_len", "tokens_sampled")
    out = {"loss_1": l1, "loss_8": l8, "grad_scale": scale, "max_grad_diff": diff}
    out["trainer_1"] = [{k: m[k] for k in keys} for m in m1]
    out["trainer_8"] = [{k: m[k] for k in keys} for m in m8]
    out["trainer_lora_moved"] = max(float(np.abs(a).max()) for a in lora1)
    out["trainer_lora_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(lora1, lora8))
    out["sampling"] = sampling_agreement(tr8, tr1, sys.argv[1], s1[0])
    print(json.dumps(out))
