"""elva_jax: ELVA (ranking-driven universal multimodal retrieval) on Qwen2-VL in JAX."""

__version__ = "0.1.0"
