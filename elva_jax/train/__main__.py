"""`python -m elva_jax.train`: until the training loop lands, runs the forward/embedding smoke run."""

from elva_jax.smoke import main

if __name__ == "__main__":
    main()
