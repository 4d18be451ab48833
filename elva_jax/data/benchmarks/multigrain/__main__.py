"""``python -m elva_jax.data.benchmarks.multigrain --out DIR [--seed S] [--n-train N] [--n-test N] [--overwrite]``:
the bundled multi-grain set (:func:`elva_jax.data.benchmarks.multigrain.generator.generate`)."""

from elva_jax.data.benchmarks.multigrain.generator import main
from elva_jax.errors import cli

if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.data.benchmarks.multigrain")
