"""Contrastive objective of stages 1-2 (and of the [RET] term of the summary warm start).

InfoNCE, one direction (query -> candidate), over the *global* batch: with L2-normalised query
embeddings q [N, D] and candidates c [M, D] (M = N positives, then optional hard negatives),
    L = -1/N sum_n log( exp(q_n . c_n / tau) / sum_m exp(q_n . c_m / tau) ).
Under jit with sharded inputs XLA gathers the candidates itself, so the loss equals the
single-device loss over the same global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def info_nce(q: jnp.ndarray, c: jnp.ndarray, tau: float) -> tuple[jnp.ndarray, dict]:
    """q [N, D], c [M >= N, D] (row n of c is query n's positive). Returns (loss, metrics)."""
    q = q.astype(jnp.float32)
    c = c.astype(jnp.float32)
    logits = q @ c.T / tau  # [N, M]
    n = q.shape[0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    pos = logits[jnp.arange(n), jnp.arange(n)]
    loss = jnp.mean(lse - pos)
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == jnp.arange(n)).astype(jnp.float32))
    return loss, {"loss": loss, "acc": acc, "pos_sim": jnp.mean(pos) * tau}
