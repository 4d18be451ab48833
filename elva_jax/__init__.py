"""elva_jax: ELVA (ranking-driven universal multimodal retrieval) on Qwen-VL backbones in JAX."""

__version__ = "0.1.0"
