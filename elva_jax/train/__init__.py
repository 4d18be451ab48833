"""The run: `python -m elva_jax.train` orders the stages (sft -> contrastive -> rl), then exports and
evaluates (`stages.run`). The top of the library's layers: it imports the stages, nothing imports it."""
