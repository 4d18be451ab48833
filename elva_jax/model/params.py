"""The params pytree of Qwen2-VL: one table of every tensor (shape, logical axes, transformers name).

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

from elva_jax.model.config import Qwen2VLConfig


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


# `hf_name` is the on-disk name transformers writes (the hub layout). A state dict saved from the
# in-memory 5.x module tree uses these prefixes instead; import accepts both.
ALTERNATE_PREFIXES = (
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
)


def param_specs(cfg: Qwen2VLConfig) -> list[ParamSpec]:
    t, v = cfg.text, cfg.vision
    L, D, V, F = t.num_layers, t.hidden_size, t.vocab_size, t.intermediate_size
    Hq, Hkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    Lv, Dv, Fv = v.depth, v.embed_dim, v.mlp_dim
    Dm = Dv * v.merge_unit
    tl, vl = "model.layers.{i}.", "visual.blocks.{i}."
    S = ParamSpec
    specs = [
        S(
            ("vision", "patch_embed", "kernel"),
            (v.patch_dim, Dv),
            ("patch", "vis_embed"),
            "visual.patch_embed.proj.weight",
            "patch",
        ),
    ]
    for name, hf in (("norm1", "norm1"), ("norm2", "norm2")):
        specs += [
            S(
                ("vision", "blocks", name, "scale"),
                (Lv, Dv),
                ("layers", "vis_embed"),
                vl + hf + ".weight",
                init="ones",
            ),
            S(
                ("vision", "blocks", name, "bias"),
                (Lv, Dv),
                ("layers", "vis_embed"),
                vl + hf + ".bias",
                init="zeros",
            ),
        ]
    for name, hf, din, dout, ain, aout in (
        ("qkv", "attn.qkv", Dv, 3 * Dv, "vis_embed", "vis_qkv"),
        ("proj", "attn.proj", Dv, Dv, "vis_qkv", "vis_embed"),
        ("fc1", "mlp.fc1", Dv, Fv, "vis_embed", "vis_mlp"),
        ("fc2", "mlp.fc2", Fv, Dv, "vis_mlp", "vis_embed"),
    ):
        specs += [
            S(
                ("vision", "blocks", name, "kernel"),
                (Lv, din, dout),
                ("layers", ain, aout),
                vl + hf + ".weight",
                "linear",
            ),
            S(
                ("vision", "blocks", name, "bias"),
                (Lv, dout),
                ("layers", aout),
                vl + hf + ".bias",
                init="zeros",
            ),
        ]
    specs += [
        S(
            ("vision", "merger", "ln_q", "scale"),
            (Dv,),
            ("vis_embed",),
            "visual.merger.ln_q.weight",
            init="ones",
        ),
        S(
            ("vision", "merger", "ln_q", "bias"),
            (Dv,),
            ("vis_embed",),
            "visual.merger.ln_q.bias",
            init="zeros",
        ),
        S(
            ("vision", "merger", "fc1", "kernel"),
            (Dm, Dm),
            ("merge", "vis_mlp"),
            "visual.merger.mlp.0.weight",
            "linear",
        ),
        S(
            ("vision", "merger", "fc1", "bias"),
            (Dm,),
            ("vis_mlp",),
            "visual.merger.mlp.0.bias",
            init="zeros",
        ),
        S(
            ("vision", "merger", "fc2", "kernel"),
            (Dm, D),
            ("vis_mlp", "embed"),
            "visual.merger.mlp.2.weight",
            "linear",
        ),
        S(
            ("vision", "merger", "fc2", "bias"),
            (D,),
            ("embed",),
            "visual.merger.mlp.2.bias",
            init="zeros",
        ),
        S(
            ("text", "embed_tokens", "embedding"),
            (V, D),
            ("vocab", "embed"),
            "model.embed_tokens.weight",
        ),
        S(
            ("text", "layers", "input_norm", "scale"),
            (L, D),
            ("layers", "embed"),
            tl + "input_layernorm.weight",
            init="ones",
        ),
        S(
            ("text", "layers", "post_attn_norm", "scale"),
            (L, D),
            ("layers", "embed"),
            tl + "post_attention_layernorm.weight",
            init="ones",
        ),
    ]
    for name, dout, aout in (
        ("q_proj", Hq, "heads"),
        ("k_proj", Hkv, "kv_heads"),
        ("v_proj", Hkv, "kv_heads"),
    ):
        specs += [
            S(
                ("text", "layers", name, "kernel"),
                (L, D, dout),
                ("layers", "embed", aout),
                tl + f"self_attn.{name}.weight",
                "linear",
            ),
            S(
                ("text", "layers", name, "bias"),
                (L, dout),
                ("layers", aout),
                tl + f"self_attn.{name}.bias",
                init="zeros",
            ),
        ]
    specs += [
        S(
            ("text", "layers", "o_proj", "kernel"),
            (L, Hq, D),
            ("layers", "heads", "embed"),
            tl + "self_attn.o_proj.weight",
            "linear",
        ),
        S(
            ("text", "layers", "gate_proj", "kernel"),
            (L, D, F),
            ("layers", "embed", "mlp"),
            tl + "mlp.gate_proj.weight",
            "linear",
        ),
        S(
            ("text", "layers", "up_proj", "kernel"),
            (L, D, F),
            ("layers", "embed", "mlp"),
            tl + "mlp.up_proj.weight",
            "linear",
        ),
        S(
            ("text", "layers", "down_proj", "kernel"),
            (L, F, D),
            ("layers", "mlp", "embed"),
            tl + "mlp.down_proj.weight",
            "linear",
        ),
        S(("text", "norm", "scale"), (D,), ("embed",), "model.norm.weight", init="ones"),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(S(("text", "lm_head", "kernel"), (D, V), ("embed", "vocab"), "lm_head.weight", "linear"))
    return specs


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


def logical_axes(cfg: Qwen2VLConfig) -> dict:
    """Pytree with the params' structure whose leaves are tuples of logical axis names."""
    out: dict = {}
    for s in param_specs(cfg):
        set_path(out, s.path, s.axes)
    return out


def abstract_params(cfg: Qwen2VLConfig, dtype=jnp.float32) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` (no memory), e.g. for `eval_shape` / AOT planning."""
    out: dict = {}
    for s in param_specs(cfg):
        set_path(out, s.path, jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)))
    return out


def init_params(cfg: Qwen2VLConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
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
