"""RL update over instance micro-batches (`rl.micro_instances`) equals the one-pass update.

Oracle: value_and_grad of `rl_loss` on the whole batch in one pass; the micro-batched path scans
`rl_loss` over instance slices with the whole batch's denominator. Checked for every loss type, with
the auxiliary soft-ranking term on, and with a sequence whose mask is all padding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.contrastive import tiny_cfg, tiny_params

from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.rollout import RLConfig, rl_loss, rl_loss_and_grad, split_instances

I, G, S, P, T = 4, 2, 3, 8, 5
D, N = I * S, I * S * G
CFG = tiny_cfg()
OPTS = ModelOptions(matmul_precision="highest")
LCFG = LoraConfig(rank=4, alpha=8)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, N)
    gen = rng.integers(1, 400, (N, T)).astype(np.int32)
    gen[np.arange(N), lengths - 1] = 501
    mask = np.arange(T)[None] < lengths[:, None]
    mask[5] = False  # a sequence with no sampled token (e.g. an appended [RET] only)
    ids = rng.integers(1, 400, (D, P)).astype(np.int32)
    am = np.ones((D, P), np.int32)
    am[1, :2] = 0
    valid = np.ones((I, S - 1), bool)
    valid[2, 0] = False
    return (
        ids,
        am,
        {
            "prompts": build_inputs(CFG, OPTS, ids, am),
            "gen_tokens": np.where(mask, gen, 0),
            "gen_lengths": lengths.astype(np.int32),
            "mask": mask,
            "old_logp": rng.normal(-5, 0.3, (N, T)).astype(np.float32),
            "ref_logp": rng.normal(-5, 0.3, (N, T)).astype(np.float32),
            "adv": rng.normal(0, 1, N).astype(np.float32),
            "valid": valid,
        },
    )


@pytest.fixture(scope="module")
def setup():
    params = tiny_params(CFG)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(CFG, LCFG, jax.random.key(1)))
    return (params, lora, *_batch())


def _per_chunk_prompts(ids, am, m):
    """Each chunk's model inputs built from its own prompts, stacked (as the trainer passes them)."""
    n = m * S
    chunks = [build_inputs(CFG, OPTS, ids[c * n : (c + 1) * n], am[c * n : (c + 1) * n]) for c in range(I // m)]
    return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_micro_batched_gradient_equals_one_pass(setup, loss_type):
    params, lora, ids, am, batch = setup
    rcfg = RLConfig(group_size=G, beta=0.2, aux_soft_rank_weight=0.5, loss_type=loss_type)
    kw = dict(cfg=CFG, opts=OPTS, reward_cfg=RewardConfig(), lora_scale=LCFG.scale)
    (l1, _), g1 = jax.jit(
        lambda lo: jax.value_and_grad(rl_loss, has_aux=True)(lo, params, batch, rcfg=rcfg, shape=(I, G, S), **kw)
    )(lora)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
    assert scale > 0
    # the aggregation differs by loss type; the scan length by m (checked once, with grpo)
    for m in (1, 2) if loss_type == "grpo" else (2,):
        micro = split_instances({**batch, "prompts": _per_chunk_prompts(ids, am, m)}, (I, G, S), m)
        assert micro["mask"].shape == (I // m, m * S * G, T) and micro["prompts"]["positions"].shape[:3] == (
            I // m,
            3,
            m * S,
        )
        loss, metrics, g = jax.jit(lambda lo, mb: rl_loss_and_grad(lo, params, mb, rcfg=rcfg, shape=(I, G, S), **kw))(
            lora, micro
        )
        assert abs(float(loss) - float(l1)) <= 1e-5 * max(1.0, abs(float(l1)))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1), strict=True))
        assert diff <= 1e-5 * scale, (m, diff, scale)
        assert np.isfinite(float(metrics["kl_mean"]))


def test_micro_instances_must_divide_and_prompts_come_per_chunk():
    _, _, batch = _batch()
    with pytest.raises(ValueError, match="do not split"):
        split_instances(batch, (I, G, S), 3)
    with pytest.raises(ValueError, match="stacked per micro-batch"):  # flat prompts cannot be cut by rows
        split_instances(batch, (I, G, S), 2)
