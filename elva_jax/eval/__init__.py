"""Evaluation (`python -m elva_jax.eval`; metrics and exact top-k live in `elva_jax.retrieval`).

runner: ``evaluate``, the steps in order; checkpoints: checkpoint / run dir -> model, mode, weight identity;
benchmarks and tasks: a benchmark's task specs, loaded tasks, instructions; embed (the Embedder and the
embedding conventions), embed_config (EmbedConfig), embed_cache (the on-disk parts), corpus (corpus batches);
cot: the reasoner's T-CoTs; recall: Recall@K / MRR per task; mmeb: MMEB-V2 scoring; grain: grain masking;
reports: results.json / results.md / recall.png.
"""
