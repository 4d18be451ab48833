"""The RL stage's probe (`RLTrainer.probe`, `rl.loop.split_probe`): a fixed held-out set scored with a fixed
sampling key, checked against a numpy sort-based reward over teacher-forced [RET] embeddings of the same
samples; the probe leaves the policy and its key untouched and repeats exactly."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from helpers.rl_setup import instances, make_trainer

from elva_jax.rl.instances import split_probe
from elva_jax.rl.rewards import RewardConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = instances(str(tmp_path_factory.mktemp("mg")))
    tr, st = make_trainer(cache_dtype="float32")
    return data[:4], tr, st


def _np_reward(s: np.ndarray, cfg: RewardConfig) -> tuple[float, float, float]:
    """(total, margin, ranking) of one rollout's similarities s [C] (positive first), float64, by a stable
    descending sort."""
    order = np.argsort(-s, kind="stable")
    rank = np.empty(len(s), np.int64)
    rank[order] = np.arange(1, len(s) + 1)
    log = lambda x: math.log(x, cfg.log_base)  # noqa: E731
    ranking = s[0] / (1 + log(rank[0])) - cfg.gamma * sum(s[k] * (log(rank[k]) - 1) for k in range(1, len(s)))
    margin = max(0.0, s[0] - s[1:].max() - cfg.delta)
    return cfg.alpha * margin + cfg.epsilon * ranking, margin, ranking


def test_probe_equals_numpy_rewards_of_its_samples_and_repeats(setup):
    insts, tr, st = setup
    key = jax.random.key(7)
    lora0 = jax.tree.map(np.asarray, st.lora)
    key0 = np.asarray(jax.random.key_data(st.key))
    p = tr.probe(st, insts, key, chunk=2)
    # the oracle: the same draws (chunk c sampled with fold_in(key, c)), embeddings from the teacher-forced
    # pass, cosine and rewards in numpy
    want = {"reward": [], "margin": [], "ranking": [], "top1": []}
    for c in range(0, 4, 2):
        s2 = dataclasses.replace(st, key=jax.random.fold_in(key, c))
        out, _, (I, G, S), chunks = tr.rollouts(s2, insts[c : c + 2])
        _, _, emb = tr.reforward(s2, chunks, out.tokens, out.lengths, G, logps=False, embeddings=True)
        e = np.asarray(emb, np.float64).reshape(I, S, G, -1)  # prompt-major rows
        for i in range(I):
            for g in range(G):
                sims = np.array([e[i, 0, g] @ e[i, 1 + j, g] for j in range(S - 1)])
                t, m, r = _np_reward(sims, tr.reward_cfg)
                want["reward"].append(t), want["margin"].append(m), want["ranking"].append(r)
                want["top1"].append(float(sims[0] >= sims[1:].max()))
    for k, v in want.items():
        assert p[f"probe_{k}"] == pytest.approx(np.mean(v), abs=2e-5), k
    # nothing of the policy moved, its own sampling key included; the same key gives the same numbers
    for a, b in zip(jax.tree.leaves(st.lora), jax.tree.leaves(lora0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(st.key)), key0)
    assert tr.probe(st, insts, key, chunk=2) == p
    assert tr.probe(st, insts, jax.random.key(8), chunk=2) != p  # another key, other draws
    assert f"positive first {p['probe_top1']:.3f}" in tr.probe_line(p)  # the loop's log line


def test_split_probe_holds_out_a_seeded_disjoint_set():
    items = [f"i{k}" for k in range(20)]
    train, probe = split_probe(items, 6, seed=3)
    assert len(probe) == 6 and len(train) == 14
    assert sorted([*train, *probe]) == sorted(items)  # disjoint, nothing lost
    assert list(probe) == list(split_probe(items, 6, seed=3)[1])  # the same seed, the same probe set
    assert list(probe) != list(split_probe(items, 6, seed=4)[1])
    assert split_probe(items, 0, seed=3) == (items, None)
    with pytest.raises(ValueError, match="leaves none"):
        split_probe(items, 20, seed=3)
