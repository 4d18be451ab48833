"""`python -m elva_jax.train [--config FILE] [key=value ...]`: the main command."""

from elva_jax.errors import cli
from elva_jax.train.stages import main

if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.train")
