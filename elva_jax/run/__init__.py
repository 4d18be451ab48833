"""Run orchestration above the stages: contrastive -> RL -> export -> eval (`stages.run`), and the main
command `python -m elva_jax.train` (also `python -m elva_jax.run`)."""
