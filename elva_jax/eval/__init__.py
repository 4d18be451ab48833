"""Evaluation: pool embedding with a cache, benchmark tasks, the runner and `python -m elva_jax.eval`
(metrics and exact top-k live in `elva_jax.retrieval`)."""
