"""`python -m elva_jax.train`: see elva_jax.train.run."""

from elva_jax.train.run import main

if __name__ == "__main__":
    main()
