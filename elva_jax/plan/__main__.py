"""`python -m elva_jax.plan`: see `elva_jax.plan` for the usage."""

import sys

from elva_jax.plan.cli import main

sys.exit(main())
