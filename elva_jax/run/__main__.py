"""`python -m elva_jax.run`: the same main command as `python -m elva_jax.train`."""

from elva_jax.errors import cli
from elva_jax.run.stages import main

if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.run")
