"""`python -m elva_jax.plan`: see `elva_jax.plan` for the usage."""

import sys

from elva_jax.errors import cli
from elva_jax.plan.cli import main

sys.exit(cli(main, prog="python -m elva_jax.plan"))
