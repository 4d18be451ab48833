"""Embedding read-out positions on hand-built rows (left/right padding, repeated special tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.model.embedding import eol_embedding, last_token_embedding, ret_embedding

EMB, RET = 9, 8


def _hidden(B, L, D=4):
    # hidden[b, l] = one-hot-ish code of (b, l) so the picked position is readable
    h = np.zeros((B, L, D), np.float32)
    for b in range(B):
        for l in range(L):
            h[b, l] = [b + 1, l + 1, 0, 0]
    return jnp.asarray(h)


def test_positions_by_hand():
    ids = jnp.array(
        [
            [0, 0, 5, 6, EMB, 7],  # left pad, <emb> at 4 -> read position 3
            [5, RET, 6, RET, 0, 0],  # right pad, literal [RET] in the prompt then the written one at 3
        ]
    )
    am = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    h = _hidden(2, 6)
    e = eol_embedding(h, ids, EMB, am, normalize=False)
    assert e[0, 1] == 4  # position 3 (1-based code 4)
    r = ret_embedding(h, ids, RET, am, normalize=False)
    assert r[1, 1] == 4  # last [RET] at position 3
    last = last_token_embedding(h, am, normalize=False)
    assert last[0, 1] == 6 and last[1, 1] == 4


def test_normalized_and_jittable():
    ids = jnp.array([[1, 2, EMB], [3, EMB, 0]])
    am = jnp.array([[1, 1, 1], [1, 1, 0]])
    h = jax.random.normal(jax.random.key(0), (2, 3, 16))
    e = jax.jit(lambda h, i, m: eol_embedding(h, i, EMB, m))(h, ids, am)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-6)
    want = np.asarray(h)[[0, 1], [1, 0]]
    np.testing.assert_allclose(e, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-6)
