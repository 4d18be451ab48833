"""Small numerical building blocks shared by the vision tower and the decoder (pure jnp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so rows with every key masked (padding queries) give no NaN


def precision(name: str):
    return {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}[name]


def dense(x, p: dict, dtype, prec=None, lora: dict | None = None, lora_scale: float = 1.0, dropout=None):
    """y = x @ kernel (+ bias) (+ lora_scale * (drop(x) @ A) @ B). kernel [in, out], A [in, r], B [r, out].

    dropout: None, or (key, rate): inverted dropout on the LoRA branch's input only (PEFT's
    ``lora_dropout``: each element kept with probability 1 - rate and scaled by 1 / (1 - rate)).
    """
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(dtype), precision=prec)
    if lora is not None:
        xa = x
        if dropout is not None:
            key, rate = dropout
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xa = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))
        a = jnp.einsum("...i,ir->...r", xa, lora["a"].astype(dtype), precision=prec)
        y = y + lora_scale * jnp.einsum("...r,ro->...o", a, lora["b"].astype(dtype), precision=prec)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def rms_norm(x, scale, eps: float):
    """Qwen2 RMSNorm: normalise in fp32, cast back to x.dtype, then multiply by the scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def layer_norm(x, p: dict, eps: float):
    """LayerNorm with statistics in fp32, output in x.dtype."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def attention(q, k, v, mask, prec=None):
    """Softmax attention with grouped KV heads.

    q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (Hq = G * Hkv), mask [B, Tq, Tk] bool (True = attend).
    Scores and softmax in fp32; probabilities cast to q.dtype before the value product.
    Returns [B, Tq, Hq, D].
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    qg = q.reshape(B, Tq, Hkv, g, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, precision=prec, preferred_element_type=jnp.float32)
    s = s * (D**-0.5)
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, precision=prec)
    return o.reshape(B, Tq, Hq, D)
