"""Retrieval: UniIR M-BEIR Recall@K metrics (numpy) and exact streaming top-k (JAX), used by negative
mining (RL) and by evaluation.

``streaming_topk`` is imported lazily so metric-only users do not import jax.
"""

from elva_jax.retrieval.metrics import (
    mrr_from_topk,
    ranks_of_first_relevant,
    recall_at_k,
    recall_from_topk,
    recall_table,
)

__all__ = [
    "mrr_from_topk",
    "ranks_of_first_relevant",
    "recall_at_k",
    "recall_from_topk",
    "recall_table",
    "streaming_topk",
]


def __getattr__(name: str):
    if name == "streaming_topk":  # lazy on purpose: metric-only users do not import jax
        from elva_jax.retrieval.topk import streaming_topk

        return streaming_topk
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
