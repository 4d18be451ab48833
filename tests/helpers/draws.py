"""Comparing sampled or greedy tokens from two computations whose logits may differ in the last bits.

Another reduction order (a device mesh, a batch of another size, a KV cache, another CPU kind) changes
logits by ~1e-7 relative. An inverse-CDF draw (`elva_jax.model.sampler`) then moves only where its
uniform sits that close to a boundary between two tokens, and a greedy argmax only where the top two
logits are that close. From the first differing token on, a row continues from another prefix.
These helpers accept exactly those differences and nothing else, so a real bug (wrong rows, wrong
logits, a wrong key) still fails.
"""

from __future__ import annotations

import numpy as np


def first_differences(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """(row, position) of the first differing token of every row of [N, T] token arrays that differ."""
    a, b = np.asarray(a), np.asarray(b)
    rows = np.nonzero((a != b).any(1))[0]
    return [(int(r), int(np.argmax(a[r] != b[r]))) for r in rows]


def assert_same_draws(a, b, *, min_rows_equal: float = 0.75) -> None:
    """Inverse-CDF draws over the vocabulary in id order with the same uniforms: rows equal, or their
    first differing tokens are neighbours in id order (a CDF boundary moved); at least
    ``min_rows_equal`` of the rows identical. (Without top-k / top-p every token has mass, so the
    neighbour of a boundary is the next id.)"""
    a, b = np.asarray(a), np.asarray(b)
    diffs = first_differences(a, b)
    far = [(r, t, int(a[r, t]), int(b[r, t])) for r, t in diffs if abs(int(a[r, t]) - int(b[r, t])) != 1]
    assert not far, f"draws differ beyond a CDF boundary (row, pos, token a, token b): {far[:5]}"
    assert len(a) - len(diffs) >= min_rows_equal * len(a), f"{len(diffs)} of {len(a)} rows differ"


def assert_greedy_equal_up_to_ties(got, ref, logits, *, tol: float = 1e-4) -> None:
    """Greedy tokens ``got`` [B, T] (argmax of ``logits`` [B, T, V], this side's logits along its own
    tokens) against ``ref`` [B, T]: where a row first differs, this side's logits of the two tokens must
    be within ``tol`` (a near tie that the other side broke the other way); later tokens are not
    compared (another prefix). At least half the rows must match entirely."""
    got, ref, logits = np.asarray(got), np.asarray(ref), np.asarray(logits)
    diffs = first_differences(got, ref)
    for r, t in diffs:
        gap = abs(float(logits[r, t, got[r, t]]) - float(logits[r, t, ref[r, t]]))
        assert gap <= tol, f"row {r} step {t}: greedy token {got[r, t]} vs reference {ref[r, t]}, logit gap {gap}"
    assert len(diffs) <= len(got) // 2, f"{len(diffs)} of {len(got)} rows differ (near ties only)"
