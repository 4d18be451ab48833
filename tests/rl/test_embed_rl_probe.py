"""Embed-RL's probe (`EmbedRLTrainer.probe`): held-out pairs scored with a fixed sampling key in step-sized
chunks, checked against a hand computation on the same samples (format by the official regex over the decoded
texts, ORM in numpy over the frozen embedder's vectors, in-batch negatives = the chunk's other pairs); the
probe leaves the state untouched and repeats exactly."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from helpers.embed_rl_setup import G, make_embed_rl

OFFICIAL = re.compile(r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>", re.DOTALL)
PAIRS = [
    {"id": f"p{k}", "query": {"text": q}, "cands": [{"text": c}]}
    for k, (q, c) in enumerate(
        [("a red car", "red automobile"), ("two dogs", "pups playing"), ("blue sky", "clear day"), ("a cat", "kitty")]
    )
]


def _wrap(text: str) -> str:
    """Half of the texts (by length parity) made well-formed T-CoTs, so the format rate is neither 0 nor 1."""
    return f"<thinking>{text}</thinking><rethink>x</rethink><answer>{text}</answer>" if len(text) % 2 else text


@pytest.fixture(scope="module")
def setup():
    tr, st, tok = make_embed_rl()
    plain = tr.decode
    tr.decode = lambda tokens, lengths: [_wrap(t) for t in plain(tokens, lengths)]  # a random reasoner's texts
    return tr, st, tok


def _np_orm(s: np.ndarray, rows: np.ndarray, cols: np.ndarray, t: float, scale: float):
    """(orm, acc, margin) per row of ``s`` [Q, P] float64 (no ties in random similarities)."""
    out = []
    for i in range(len(s)):
        own = cols == rows[i]
        n = int(own.sum())
        top = np.argsort(-s[i], kind="stable")[:n]
        acc = own[top].sum() / n
        neg = s[i][~own]
        w = np.exp(neg / t - (neg / t).max())
        margin = s[i][own].mean() - (w / w.sum() * neg).sum()
        out.append((scale * acc * margin, acc, margin))
    return np.asarray(out)


def test_probe_equals_a_hand_computation_on_its_samples(setup):
    tr, st, tok = setup
    key, chunk = jax.random.key(11), 2
    p = tr.probe(st, PAIRS, key, chunk)
    rc = tr.reward_cfg
    rows = {"reward": [], "format": [], "orm": [], "acc": [], "margin": []}
    for c in range(0, len(PAIRS), chunk):
        pairs = PAIRS[c : c + chunk]
        out, _, (I, G_, S), _ = tr.policy.rollouts(dataclasses.replace(st, key=jax.random.fold_in(key, c)), pairs)
        assert (I, G_, S) == (chunk, G, 2)
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        texts = [_wrap(tok.decode(t[:n].tolist(), skip_special_tokens=True)) for t, n in zip(toks, lens)]
        fmt = np.array([OFFICIAL.search(t) is not None for t in texts], np.float64).reshape(I, S, G)
        sides = [pr["query"] if s == 0 else pr["cands"][0] for pr in pairs for s in range(S) for _ in range(G)]
        e = np.asarray(tr.embedder.embed(sides, texts), np.float64).reshape(I, S, G, -1)
        q, ps = e[:, 0].reshape(I * G, -1), e[:, 1].reshape(I * G, -1)
        ids = np.repeat(np.arange(I), G)
        for sims, f in ((q @ ps.T, fmt[:, 0]), (ps @ q.T, fmt[:, 1])):
            o = _np_orm(sims, ids, ids, rc.negative_temperature, rc.orm_scale)
            for j, k in enumerate(("orm", "acc", "margin")):
                rows[k] += list(o[:, j])
            rows["format"] += list(f.reshape(-1))
            rows["reward"] += list(rc.format_weight * f.reshape(-1) + rc.orm_weight * o[:, 0])
    assert 0 < np.mean(rows["format"]) < 1  # both kinds of text were scored
    for k, v in rows.items():
        assert p[f"probe_{k}"] == pytest.approx(np.mean(v), abs=2e-5), k
    assert p["probe_prm"] == 0.0  # no judge


def test_probe_leaves_the_state_alone_and_repeats(setup):
    tr, st, _ = setup
    snap = lambda s: [np.array(x) for x in jax.tree.leaves((s.params, s.lora, s.opt_state))]  # noqa: E731
    before, key0, step0 = snap(st), np.asarray(jax.random.key_data(st.key)), st.step
    p = tr.probe(st, PAIRS, jax.random.key(5), 2)
    for a, b in zip(snap(st), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(st.key)), key0)
    assert st.step == step0
    assert tr.probe(st, PAIRS, jax.random.key(5), 2) == p  # the same key, the same numbers
    assert tr.probe(st, PAIRS, jax.random.key(6), 2) != p  # another key, other draws
    assert set(p) == {f"probe_{k}" for k in ("reward", "format", "orm", "acc", "margin", "prm")}
    assert "format" in tr.probe_line(p) and "ORM" in tr.probe_line(p)
