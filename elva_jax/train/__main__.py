"""`python -m elva_jax.train`, the documented main command: an entry point only (not imported by the
library), handing over to the run orchestration in `elva_jax.run.stages`, which sits above the stages."""

from elva_jax.errors import cli
from elva_jax.run.stages import main

if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.train")
