"""Retrieval embeddings read off the final hidden states (batched, jittable).

- LamRA "EOL": the L2-normalised final hidden state at the token just before the embedding token
  (`<emb>`), i.e. the "\\n" closing `<|im_start|>assistant\\n`.
- ELVA generative: the (L2-normalised) hidden state at the `[RET]` token the model wrote after its
  summary. The instruction text itself contains the literal "[RET]", which the tokenizer maps to
  the same special token, so the *last* occurrence in the row is the one used.
- Qwen3-VL-Embedding ("instruct_last"): the L2-normalised final hidden state of the last real token
  (:func:`last_token_embedding`), which for its prompt is the "\\n" closing `<|im_start|>assistant\\n`;
  the prompt puts the instruction in the system turn and pads on the right.
"""

from __future__ import annotations

import jax.numpy as jnp


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def last_index_of(input_ids: jnp.ndarray, token_id: int, attention_mask: jnp.ndarray | None = None):
    """Index [B] of the last occurrence of token_id per row (-1 where absent)."""
    hit = input_ids == token_id
    if attention_mask is not None:
        hit = hit & attention_mask.astype(bool)
    L = input_ids.shape[1]
    pos = jnp.where(hit, jnp.arange(L)[None], -1)
    return jnp.max(pos, axis=1)


def last_token_index(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Index [B] of the last real token of each row (left or right padding)."""
    L = attention_mask.shape[1]
    return jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(L)[None], -1), axis=1)


def gather_rows(hidden: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """hidden [B, L, D], index [B] -> [B, D]."""
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def eol_embedding(hidden, input_ids, emb_token_id: int, attention_mask=None, normalize: bool = True):
    """LamRA embedding [B, D] fp32 at the position before the last `<emb>` token."""
    idx = last_index_of(input_ids, emb_token_id, attention_mask) - 1
    e = gather_rows(hidden, jnp.maximum(idx, 0))
    return l2_normalize(e) if normalize else e.astype(jnp.float32)


def ret_embedding(hidden, input_ids, ret_token_id: int, attention_mask=None, normalize: bool = True):
    """ELVA generative embedding [B, D] fp32 at the last `[RET]` token."""
    idx = last_index_of(input_ids, ret_token_id, attention_mask)
    e = gather_rows(hidden, jnp.maximum(idx, 0))
    return l2_normalize(e) if normalize else e.astype(jnp.float32)


def last_token_embedding(hidden, attention_mask, normalize: bool = True):
    """Embedding [B, D] at the last non-padding token (what `elva_jax.compare` reports)."""
    e = gather_rows(hidden, last_token_index(attention_mask))
    return l2_normalize(e) if normalize else e.astype(jnp.float32)
