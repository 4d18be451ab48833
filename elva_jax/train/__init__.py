"""The contrastive stage: InfoNCE, the jitted step over a device mesh with exact accumulation, the loop
(`python -m elva_jax.train` in __main__ is an entry point into `elva_jax.run`)."""
