"""Config parsing every Qwen-VL family shares: the text decoder fields of a config.json.

Both layouts seen in the wild are accepted: transformers 5.x (nested `text_config` with
`rope_parameters`) and the flat 4.x hub layout (`rope_scaling.mrope_section`, top-level `rope_theta`).
"""

from __future__ import annotations

from typing import Any

from elva_jax.model.config import ModelConfig, TextConfig, UnsupportedArchitectureError
from elva_jax.model.params import ParamSpec


def text_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The text config of `d` with 4.x top-level fields folded in (5.x nests them in text_config)."""
    t = dict(d.get("text_config") or {})
    for k, v in d.items():
        if k not in ("text_config", "vision_config"):
            t.setdefault(k, v)
    return t


def parse_text(d: dict[str, Any], source: str, **flags) -> TextConfig:
    """TextConfig from a config.json dict; ``flags`` set the family's TextConfig switches
    (attention_bias, qk_norm, mrope_interleaved)."""
    t = text_fields(d)
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 1000000.0))
    section = rope.get("mrope_section")
    if section is None:
        raise UnsupportedArchitectureError(f"{source}: text config has no mrope_section")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise UnsupportedArchitectureError(f"{source}: rope_type {rope_type!r} is not supported")
    if t.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{source}: sliding-window attention is not supported")
    try:
        text = TextConfig(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=int(t["num_attention_heads"]),
            num_kv_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in section),
            hidden_act=t.get("hidden_act", "silu"),
            head_dim_override=t.get("head_dim"),
            **flags,
        )
    except KeyError as e:
        raise UnsupportedArchitectureError(f"{source}: text config is missing {e}") from None
    if text.hidden_act != "silu":
        raise UnsupportedArchitectureError(f"{source}: text activation {text.hidden_act} is not supported")
    if 2 * sum(text.mrope_section) != text.head_dim:
        raise UnsupportedArchitectureError(
            f"{source}: mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}"
        )
    return text


def tie_embeddings(d: dict[str, Any]) -> bool:
    return bool(d.get("tie_word_embeddings", False) or text_fields(d).get("tie_word_embeddings", False))


def special_tokens(d: dict[str, Any]) -> dict[str, int]:
    """image / video / vision-start / vision-end token ids (Qwen's defaults where absent)."""
    return dict(
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
    )


# --- tables of tensors -------------------------------------------------------------------------------
# Builders of `ParamSpec` rows. `hf` is a transformers module name ("...weight" / "...bias" are appended;
# "{i}" in it marks a stacked tensor). `layers=n` stacks the tensor n times on a leading "layers" axis.

Row = tuple[str, str, int, int, str | None, str | None]  # (name, hf module, d_in, d_out, axis_in, axis_out)
QWEN2_BIASED = ("q_proj", "k_proj", "v_proj")  # Qwen2's attention biases (none on o_proj)
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _lead(layers: int | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    return ((), ()) if layers is None else ((layers,), ("layers",))


def linear(path, hf, dims, axes, *, layers: int | None = None, bias: bool = True) -> list[ParamSpec]:
    """A linear layer: kernel [.., d_in, d_out] (transposed from transformers' weight) and a zero bias."""
    (lead, la), (din, dout), (ain, aout) = _lead(layers), dims, axes
    specs = [ParamSpec((*path, "kernel"), (*lead, din, dout), (*la, ain, aout), hf + ".weight", "linear")]
    if bias:
        specs.append(ParamSpec((*path, "bias"), (*lead, dout), (*la, aout), hf + ".bias", init="zeros"))
    return specs


def linears(path, hf, rows: tuple[Row, ...], *, layers: int | None = None, bias: bool = True) -> list[ParamSpec]:
    """`linear` for every row, at path + (name,) and hf + module."""
    return [
        s
        for name, mod, din, dout, ain, aout in rows
        for s in linear((*path, name), hf + mod, (din, dout), (ain, aout), layers=layers, bias=bias)
    ]


def norm(path, hf, dim: int, axis: str | None, *, layers: int | None = None, bias: bool = False) -> list[ParamSpec]:
    """An RMSNorm (scale of ones) or, with `bias`, a LayerNorm (scale and a zero bias)."""
    lead, la = _lead(layers)
    specs = [ParamSpec((*path, "scale"), (*lead, dim), (*la, axis), hf + ".weight", init="ones")]
    if bias:
        specs.append(ParamSpec((*path, "bias"), (*lead, dim), (*la, axis), hf + ".bias", init="zeros"))
    return specs


def patch_embed(v, hf: str, *, bias: bool = False) -> list[ParamSpec]:
    """The patch embedding (a Conv3d in transformers, a [patch_dim, embed_dim] kernel here)."""
    path = ("vision", "patch_embed")
    specs = [ParamSpec((*path, "kernel"), (v.patch_dim, v.embed_dim), ("patch", "vis_embed"), hf + ".weight", "patch")]
    if bias:
        specs.append(ParamSpec((*path, "bias"), (v.embed_dim,), ("vis_embed",), hf + ".bias", init="zeros"))
    return specs


def vision_blocks(v, hf: str, mlp: tuple[Row, ...], *, norm_bias: bool) -> list[ParamSpec]:
    """The stacked vision blocks: norm1, norm2, attn.qkv, attn.proj, then the `mlp` rows (all biased)."""
    path, Dv = ("vision", "blocks"), v.embed_dim
    attn: tuple[Row, ...] = (
        ("qkv", "attn.qkv", Dv, 3 * Dv, "vis_embed", "vis_qkv"),
        ("proj", "attn.proj", Dv, Dv, "vis_qkv", "vis_embed"),
    )
    specs = [
        s for n in ("norm1", "norm2") for s in norm((*path, n), hf + n, Dv, "vis_embed", layers=v.depth, bias=norm_bias)
    ]
    return specs + linears(path, hf, attn + mlp, layers=v.depth)


def merger_mlp(path, hf_fc1: str, hf_fc2: str, v, out_dim: int, *, layers: int | None = None) -> list[ParamSpec]:
    """A patch merger's MLP: fc1 [merge_unit * embed_dim]^2, fc2 to the LLM width, both biased."""
    Dm = v.embed_dim * v.merge_unit
    fc1 = linear((*path, "fc1"), hf_fc1, (Dm, Dm), ("merge", "vis_mlp"), layers=layers)
    return fc1 + linear((*path, "fc2"), hf_fc2, (Dm, out_dim), ("vis_mlp", "embed"), layers=layers)


def decoder_specs(cfg: ModelConfig, hf: str, *, biased: tuple[str, ...], qk_norm: bool = False) -> list[ParamSpec]:
    """The text decoder under `hf` (e.g. "model."): embeddings, the stacked layers (attention projections
    in `biased` carry a bias; `qk_norm` adds per-head q/k RMSNorms), the final norm and an untied lm_head."""
    t = cfg.text
    L, D, V, F = t.num_layers, t.hidden_size, t.vocab_size, t.intermediate_size
    Hq, Hkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    path, tl = ("text", "layers"), hf + "layers.{i}."
    specs = [ParamSpec(("text", "embed_tokens", "embedding"), (V, D), ("vocab", "embed"), hf + "embed_tokens.weight")]
    specs += norm((*path, "input_norm"), tl + "input_layernorm", D, "embed", layers=L)
    specs += norm((*path, "post_attn_norm"), tl + "post_attention_layernorm", D, "embed", layers=L)
    if qk_norm:
        for n in ("q_norm", "k_norm"):
            specs += norm((*path, n), tl + f"self_attn.{n}", t.head_dim, None, layers=L)
    attn: tuple[Row, ...] = (
        ("q_proj", "self_attn.q_proj", D, Hq, "embed", "heads"),
        ("k_proj", "self_attn.k_proj", D, Hkv, "embed", "kv_heads"),
        ("v_proj", "self_attn.v_proj", D, Hkv, "embed", "kv_heads"),
        ("o_proj", "self_attn.o_proj", Hq, D, "heads", "embed"),
    )
    for name, mod, din, dout, ain, aout in attn:
        specs += linear((*path, name), tl + mod, (din, dout), (ain, aout), layers=L, bias=name in biased)
    mlp: tuple[Row, ...] = (
        ("gate_proj", "mlp.gate_proj", D, F, "embed", "mlp"),
        ("up_proj", "mlp.up_proj", D, F, "embed", "mlp"),
        ("down_proj", "mlp.down_proj", F, D, "mlp", "embed"),
    )
    specs += linears(path, tl, mlp, layers=L, bias=False)
    specs += norm(("text", "norm"), hf + "norm", D, "embed")
    if not cfg.tie_word_embeddings:
        specs += linear(("text", "lm_head"), "lm_head", (D, V), ("embed", "vocab"), bias=False)
    return specs


def qwen2_text_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The Qwen2 decoder's tensors (q/k/v biases), under transformers' hub names (`model.layers...`),
    shared by the Qwen2-VL and Qwen2.5-VL families."""
    return decoder_specs(cfg, "model.", biased=QWEN2_BIASED)
