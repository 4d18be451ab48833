"""Qwen2.5-VL (transformers `qwen2_5_vl`): 14-pixel patches, an RMSNorm / gated-SiLU vision tower with
2-D RoPE and window attention (full attention in `fullatt_block_indexes`), an RMSNorm PatchMerger, and
the Qwen2 decoder (q/k/v biases) with M-RoPE, as in Qwen2-VL.

The family's table of tensors, its config parser, its vision tower and its host inputs. Image
positions follow Qwen2-VL's `get_rope_index` rule; a video's temporal index is
`floor(t_index * tokens_per_second * second_per_grid_t)` (transformers' Qwen2.5-VL `get_rope_index`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from elva_jax.model.config import ModelConfig, UnsupportedArchitectureError
from elva_jax.model.families import Family
from elva_jax.model.families.common import (
    Row,
    merger_mlp,
    norm,
    parse_text,
    patch_embed,
    qwen2_text_specs,
    special_tokens,
    text_fields,
    tie_embeddings,
    vision_blocks,
)
from elva_jax.model.params import ParamSpec
from elva_jax.model.rope import mrope_positions_scaled, vision_position_ids
from elva_jax.model.vision_qwen2_5 import Qwen25VisionConfig, window_ids
from elva_jax.model.vision_qwen2_5 import vision_forward as _vision_tower

# `hf_name` is the on-disk name transformers writes (the hub layout). A state dict saved from the
# in-memory 5.x module tree uses these prefixes instead; import accepts both.
ALTERNATE_PREFIXES = (
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
)

VISION_ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU
TEXT_RMS_EPS_DEFAULT = 1e-5  # Qwen2_5_VLTextConfig's default, for configs that do not write it
VISION_RMS_EPS = 1e-6  # fixed in transformers' vision blocks and merger


def _size(v: dict, keys: tuple[str, ...], default: int, source: str) -> int:
    """An int size from the first of `keys` present (a list of equal sizes counts as one)."""
    x = next((v[k] for k in keys if k in v), default)
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise UnsupportedArchitectureError(f"{source}: non-square vision {keys[0]} {x} is not supported")
        x = x[0]
    return int(x)


def parse_vision(v: dict[str, Any], text_hidden: int, source: str) -> Qwen25VisionConfig:
    """The vision config (5.x `vision_config`; 4.x hub files use the same keys plus aliases)."""
    vrope = v.get("rope_parameters") or {}
    if vrope.get("rope_type", "axial") != "axial":
        raise UnsupportedArchitectureError(f"{source}: vision rope_type {vrope['rope_type']!r} is not supported")
    try:
        depth = int(v.get("depth", v.get("num_hidden_layers")))
        width = int(v["hidden_size"])
        heads = int(v.get("num_heads", v.get("num_attention_heads")))
        inter = int(v["intermediate_size"])
    except (KeyError, TypeError) as e:
        raise UnsupportedArchitectureError(f"{source}: vision config is missing {e}") from None
    vision = Qwen25VisionConfig(
        depth=depth,
        embed_dim=width,
        num_heads=heads,
        mlp_ratio=inter / width,
        out_hidden_size=int(v.get("out_hidden_size", text_hidden)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=_size(v, ("patch_size", "spatial_patch_size"), 14, source),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=_size(v, ("temporal_patch_size",), 2, source),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        hidden_act=v.get("hidden_act", "silu"),
        layer_norm_eps=VISION_RMS_EPS,
        intermediate_size=inter,
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=float(v.get("tokens_per_second", 4)),
    )
    if vision.hidden_act not in VISION_ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{source}: vision activation {vision.hidden_act!r} is not supported (Qwen2.5-VL uses silu)"
        )
    if vision.embed_dim % vision.num_heads or vision.head_dim % 4:
        raise UnsupportedArchitectureError(
            f"{source}: vision width {vision.embed_dim} / {vision.num_heads} heads does not give a head size "
            "divisible by 4 (2-D RoPE)"
        )
    if vision.window_units < 1:
        raise UnsupportedArchitectureError(
            f"{source}: window_size {vision.window_size} is smaller than one merge unit "
            f"({vision.spatial_merge_size} x {vision.patch_size} pixels)"
        )
    return vision


def parse_config(d: dict[str, Any], source: str) -> ModelConfig:
    if "rms_norm_eps" not in text_fields(d):
        d_text = dict(d)
        d_text["text_config"] = {**(d.get("text_config") or {}), "rms_norm_eps": TEXT_RMS_EPS_DEFAULT}
    else:
        d_text = d
    text = parse_text(d_text, source, attention_bias=True)
    vision = parse_vision(dict(d.get("vision_config") or {}), text.hidden_size, source)
    if vision.out_hidden_size != text.hidden_size:
        raise UnsupportedArchitectureError(
            f"{source}: vision merger outputs {vision.out_hidden_size}, LLM hidden is {text.hidden_size}"
        )
    return ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=tie_embeddings(d),
        model_type="qwen2_5_vl",
        raw=d,
        **special_tokens(d),
    )


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The vision tower's tensors (RMSNorms, gated MLP), then the Qwen2 decoder's (`common.qwen2_text_specs`)."""
    v = cfg.vision
    Dv, Fv = v.embed_dim, v.mlp_dim
    mlp: tuple[Row, ...] = (
        ("gate_proj", "mlp.gate_proj", Dv, Fv, "vis_embed", "vis_mlp"),
        ("up_proj", "mlp.up_proj", Dv, Fv, "vis_embed", "vis_mlp"),
        ("down_proj", "mlp.down_proj", Fv, Dv, "vis_mlp", "vis_embed"),
    )
    return [
        *patch_embed(v, "visual.patch_embed.proj"),
        *vision_blocks(v, "visual.blocks.{i}.", mlp, norm_bias=False),
        *norm(("vision", "merger", "ln_q"), "visual.merger.ln_q", Dv, "vis_embed"),
        *merger_mlp(("vision", "merger"), "visual.merger.mlp.0", "visual.merger.mlp.2", v, cfg.text.hidden_size),
        *qwen2_text_specs(cfg),
    ]


def vision_forward(params: dict, inputs: dict, cfg: ModelConfig, opts):
    feats, valid = _vision_tower(
        params,
        inputs["patches"],
        inputs["vision_segment_ids"],
        inputs["vision_pos"],
        inputs["vision_window"],
        cfg.vision,
        opts,
    )
    return feats, valid, None


def patch_inputs(grids, cfg: ModelConfig) -> dict:
    """vision_pos [N, 2] (patch row, col) and vision_window [N, 2] (frame, window) per patch."""
    return {
        "vision_pos": vision_position_ids(grids, cfg.vision.spatial_merge_size),
        "vision_window": window_ids(grids, cfg.vision),
    }


def position_ids(
    input_ids, attention_mask, image_grid_thw, cfg: ModelConfig, mode: str, video_grid_thw=None, second_per_grid_ts=None
):
    """Qwen2.5-VL's M-RoPE ids: video t index = floor(t_index * tokens_per_second * second_per_grid_t) in
    float32 (second_per_grid_t defaults to 1 per video, as in transformers when none is given)."""
    interval = None
    if video_grid_thw is not None:
        n = len(np.asarray(video_grid_thw).reshape(-1, 3))
        spg = np.ones(n, np.float32) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float32)
        if spg.shape != (n,):
            raise ValueError(f"second_per_grid_ts has shape {spg.shape}, expected ({n},) (one per video)")
        interval = np.float32(cfg.vision.tokens_per_second) * spg
    return mrope_positions_scaled(input_ids, attention_mask, image_grid_thw, cfg, mode, video_grid_thw, interval)


FAMILY = Family(
    model_type="qwen2_5_vl",
    description="Qwen2.5-VL",
    parse_config=parse_config,
    param_specs=param_specs,
    vision_forward=vision_forward,
    patch_inputs=patch_inputs,
    position_ids=position_ids,
    alternate_prefixes=ALTERNATE_PREFIXES,
    hf_model_class="transformers.Qwen2_5_VLForConditionalGeneration",
    hf_video_kwargs=("second_per_grid_ts",),
)
