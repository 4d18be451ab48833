"""Qwen2-VL (transformers `qwen2_vl`): 14-pixel patches, a LayerNorm / quick-GELU vision tower with 2-D
RoPE and a PatchMerger, and a Qwen2 decoder (q/k/v biases) with M-RoPE.

The family's table of tensors, its config parser, its vision tower and its host inputs.
"""

from __future__ import annotations

from typing import Any

from elva_jax.model.config import ModelConfig, UnsupportedArchitectureError, VisionConfig
from elva_jax.model.families import Family
from elva_jax.model.families.common import (
    Row,
    merger_mlp,
    norm,
    parse_text,
    patch_embed,
    qwen2_text_specs,
    special_tokens,
    tie_embeddings,
    vision_blocks,
)
from elva_jax.model.params import ParamSpec
from elva_jax.model.rope import mrope_positions_for, vision_position_ids
from elva_jax.model.vision import vision_forward as _vision_tower

# `hf_name` is the on-disk name transformers writes (the hub layout). A state dict saved from the
# in-memory 5.x module tree uses these prefixes instead; import accepts both.
ALTERNATE_PREFIXES = (
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
)


def parse_config(d: dict[str, Any], source: str) -> ModelConfig:
    text = parse_text(d, source, attention_bias=True)
    v = dict(d.get("vision_config") or {})
    vrope = v.get("rope_parameters") or {}
    try:
        vision = VisionConfig(
            depth=int(v["depth"]),
            embed_dim=int(v["embed_dim"]),
            num_heads=int(v["num_heads"]),
            mlp_ratio=float(v.get("mlp_ratio", 4)),
            out_hidden_size=int(v.get("hidden_size", text.hidden_size)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            patch_size=int(v.get("patch_size", v.get("spatial_patch_size", 14))),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=v.get("hidden_act", "quick_gelu"),
        )
    except KeyError as e:
        raise UnsupportedArchitectureError(f"{source}: vision config is missing {e}") from None
    if vision.hidden_act != "quick_gelu":
        raise UnsupportedArchitectureError(f"{source}: vision activation {vision.hidden_act} is not supported")
    if vision.out_hidden_size != text.hidden_size:
        raise UnsupportedArchitectureError(
            f"{source}: vision merger outputs {vision.out_hidden_size}, LLM hidden is {text.hidden_size}"
        )
    return ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=tie_embeddings(d),
        model_type="qwen2_vl",
        raw=d,
        **special_tokens(d),
    )


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The vision tower's tensors, then the Qwen2 decoder's (`common.qwen2_text_specs`)."""
    v = cfg.vision
    Dv, Fv = v.embed_dim, v.mlp_dim
    mlp: tuple[Row, ...] = (
        ("fc1", "mlp.fc1", Dv, Fv, "vis_embed", "vis_mlp"),
        ("fc2", "mlp.fc2", Fv, Dv, "vis_mlp", "vis_embed"),
    )
    return [
        *patch_embed(v, "visual.patch_embed.proj"),
        *vision_blocks(v, "visual.blocks.{i}.", mlp, norm_bias=True),
        *norm(("vision", "merger", "ln_q"), "visual.merger.ln_q", Dv, "vis_embed", bias=True),
        *merger_mlp(("vision", "merger"), "visual.merger.mlp.0", "visual.merger.mlp.2", v, cfg.text.hidden_size),
        *qwen2_text_specs(cfg),
    ]


def vision_forward(params: dict, inputs: dict, cfg: ModelConfig, opts):
    feats, valid = _vision_tower(
        params, inputs["patches"], inputs["vision_segment_ids"], inputs["vision_pos"], cfg.vision, opts
    )
    return feats, valid, None


def patch_inputs(grids, cfg: ModelConfig) -> dict:
    return {"vision_pos": vision_position_ids(grids, cfg.vision.spatial_merge_size)}


FAMILY = Family(
    model_type="qwen2_vl",
    description="Qwen2-VL",
    parse_config=parse_config,
    param_specs=param_specs,
    vision_forward=vision_forward,
    patch_inputs=patch_inputs,
    position_ids=mrope_positions_for,
    alternate_prefixes=ALTERNATE_PREFIXES,
    hf_model_class="transformers.Qwen2VLForConditionalGeneration",
)
