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


def qwen2_text_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The Qwen2 decoder's tensors (q/k/v biases), under transformers' hub names (`model.layers...`),
    shared by the Qwen2-VL and Qwen2.5-VL families."""
    t = cfg.text
    L, D, V, F = t.num_layers, t.hidden_size, t.vocab_size, t.intermediate_size
    Hq, Hkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    tl = "model.layers.{i}."
    S = ParamSpec
    specs = [
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
