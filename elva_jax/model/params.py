"""The params pytree of a backbone: one table of every tensor (shape, logical axes, transformers name).

The table drives random init, checkpoint import/export and sharding, so the three can never drift.
Layout conventions (JAX-style, not torch-style):
- linear kernels are [in, out] (torch stores [out, in]); biases [out];
- per-layer tensors are stacked on a leading "layers" axis so the decoder runs as one `lax.scan`;
- norms hold "scale" (and "bias" for LayerNorm); the token table is "embedding" [vocab, hidden].

Logical axis names (mapped to mesh axes by one rules table in the training code):
"layers", "vocab", "embed", "heads" (q heads x head_dim), "kv_heads" (kv heads x head_dim), "mlp",
"vis_embed", "vis_qkv", "vis_mlp", "patch", "merge".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.model.config import ModelConfig
from elva_jax.model.families import family_of


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One tensor of the pytree.

    path: keys into the nested dict. shape / axes: JAX layout and its logical axis names.
    hf_name: the name in a transformers safetensors file; "{i}" is the layer index for stacked tensors.
    layout: how the transformers tensor maps to ours: "same", "linear" (transpose), "patch"
        (Conv3d weight [out, C, T, P, P] -> [C*T*P*P, out]).
    init: "normal" | "ones" | "zeros" for random init.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf_name: str
    layout: str = "same"
    init: str = "normal"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every tensor of the model, from the family's table (`elva_jax.model.families`)."""
    return family_of(cfg).param_specs(cfg)


def iter_leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from iter_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def logical_axes(cfg: ModelConfig) -> dict:
    """Pytree with the params' structure whose leaves are tuples of logical axis names."""
    out: dict = {}
    for s in param_specs(cfg):
        set_path(out, s.path, s.axes)
    return out


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` (no memory), e.g. for `eval_shape` / AOT planning."""
    out: dict = {}
    for s in param_specs(cfg):
        set_path(out, s.path, jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)))
    return out


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params (normal(0, std) weights, unit norm scales, zero biases) for tests and smoke runs."""
    out: dict = {}
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    for k, s in zip(keys, specs):
        if s.init == "ones":
            x = jnp.ones(s.shape, dtype)
        elif s.init == "zeros":
            x = jnp.zeros(s.shape, dtype)
        else:
            x = (std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
        set_path(out, s.path, x)
    return out


def count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for _, x in iter_leaves(params)))
