"""Qwen3-VL, dense (transformers `qwen3_vl`): 16-pixel patches with a biased patch embedding and an
interpolated learned position table, a LayerNorm / GELU(tanh) vision tower with 2-D RoPE, a merger and
DeepStack mergers; a Qwen3 decoder (no q/k/v bias, per-head q/k RMSNorm, explicit head_dim) with
interleaved M-RoPE and DeepStack features added after its first layers.

The family's table of tensors, its config parser, its vision tower and its host inputs. Position ids
for images follow the same rule as Qwen2-VL (`rope.mrope_positions_for`); a video of grid (t, h, w) is
t grids (1, h, w), one per temporal patch, each its own `<|video_pad|>` run (the prompt puts a text
timestamp `<x.x seconds>` and vision start/end tokens around every frame), as transformers'
Qwen3-VL `get_rope_index` splits `video_grid_thw`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from elva_jax.model.config import ModelConfig, UnsupportedArchitectureError
from elva_jax.model.families import Family
from elva_jax.model.families.common import (
    ATTN_PROJ,
    Row,
    decoder_specs,
    merger_mlp,
    norm,
    parse_text,
    patch_embed,
    special_tokens,
    text_fields,
    tie_embeddings,
    vision_blocks,
)
from elva_jax.model.params import ParamSpec
from elva_jax.model.rope import mrope_positions_for, vision_position_ids
from elva_jax.model.vision_qwen3 import Qwen3VisionConfig, pos_embed_taps
from elva_jax.model.vision_qwen3 import vision_forward as _vision_tower

VISION_ACTS = ("gelu_pytorch_tanh",)
# transformers' Qwen3VLTextConfig defaults where a config.json leaves a field out
TEXT_DEFAULTS = {"head_dim": 128, "rope_theta": 500000.0}


def _with_text_defaults(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    t = d["text_config"] if isinstance(d.get("text_config"), dict) else d
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    t.setdefault("head_dim", TEXT_DEFAULTS["head_dim"])
    if "rope_theta" not in rope and "rope_theta" not in t and "rope_theta" not in d:
        t["rope_theta"] = TEXT_DEFAULTS["rope_theta"]
    return d


def _parse_vision(v: dict[str, Any], source: str) -> Qwen3VisionConfig:
    """The vision config (`vision_config`); its checks that need no text config."""
    vrope = v.get("rope_parameters") or {}
    try:
        patch = v.get("patch_size", 16)
        temporal = v.get("temporal_patch_size", 2)
        if not isinstance(patch, int) or not isinstance(temporal, int):
            raise UnsupportedArchitectureError(f"{source}: non-square patch sizes {patch}, {temporal}")
        dim = int(v["hidden_size"])
        inter = int(v["intermediate_size"])
        vision = Qwen3VisionConfig(
            depth=int(v["depth"]),
            embed_dim=dim,
            num_heads=int(v["num_heads"]),
            mlp_ratio=inter / dim,
            out_hidden_size=int(v["out_hidden_size"]),
            in_channels=int(v.get("in_channels", 3)),
            patch_size=patch,
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            temporal_patch_size=temporal,
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            intermediate_size=inter,
            num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
            deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", (8, 16, 24))),
            # Qwen3-VL's processor normalises with mean = std = 0.5 (not CLIP's statistics)
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
        )
    except KeyError as e:
        raise UnsupportedArchitectureError(f"{source}: vision config is missing {e}") from None
    if vision.hidden_act not in VISION_ACTS:
        raise UnsupportedArchitectureError(
            f"{source}: vision activation {vision.hidden_act!r} is not supported (only {VISION_ACTS})"
        )
    return vision


def parse_config(d: dict[str, Any], source: str) -> ModelConfig:
    if d.get("model_type", "qwen3_vl") != "qwen3_vl":
        raise UnsupportedArchitectureError(f"{source}: model_type {d.get('model_type')!r} is not qwen3_vl")
    t = text_fields(d)
    if t.get("num_experts") or str(t.get("model_type", "")).endswith("moe_text"):
        raise UnsupportedArchitectureError(f"{source}: Qwen3-VL MoE (qwen3_vl_moe) is not supported, only dense")
    text = parse_text(
        _with_text_defaults(d),
        source,
        attention_bias=bool(t.get("attention_bias", False)),
        qk_norm=True,
        mrope_interleaved=True,  # transformers' Qwen3-VL always interleaves, whatever the flag says
    )
    vision = _parse_vision(dict(d.get("vision_config") or {}), source)
    if vision.out_hidden_size != text.hidden_size:
        raise UnsupportedArchitectureError(
            f"{source}: vision merger outputs {vision.out_hidden_size}, LLM hidden is {text.hidden_size}"
        )
    bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
    if bad:
        raise UnsupportedArchitectureError(
            f"{source}: deepstack_visual_indexes {bad} outside the {vision.depth} blocks"
        )
    if vision.num_grid_per_side < 1:
        raise UnsupportedArchitectureError(f"{source}: num_position_embeddings {vision.num_position_embeddings}")
    return ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=tie_embeddings(d),
        model_type="qwen3_vl",
        raw=d,
        **special_tokens(d),
    )


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The vision tower's tensors (biased patch embedding, learned position table, LayerNorm blocks, the
    merger and the stacked DeepStack mergers), then the Qwen3 decoder's (q/k norms; biases on all four
    attention projections when `attention_bias`)."""
    v, D = cfg.vision, cfg.text.hidden_size
    Dv, Fv, K = v.embed_dim, v.mlp_dim, len(v.deepstack_visual_indexes)
    mlp: tuple[Row, ...] = (
        ("fc1", "mlp.linear_fc1", Dv, Fv, "vis_embed", "vis_mlp"),
        ("fc2", "mlp.linear_fc2", Fv, Dv, "vis_mlp", "vis_embed"),
    )
    specs = [
        *patch_embed(v, "model.visual.patch_embed.proj", bias=True),
        ParamSpec(
            ("vision", "pos_embed", "embedding"),
            (v.num_position_embeddings, Dv),
            (None, "vis_embed"),
            "model.visual.pos_embed.weight",
        ),
        *vision_blocks(v, "model.visual.blocks.{i}.", mlp, norm_bias=True),
    ]
    # the final merger normalises each patch (Dv); the DeepStack mergers each window (Dm)
    mergers = [("merger", None, "model.visual.merger.", Dv, "vis_embed")]
    if K:
        mergers.append(("deepstack", K, "model.visual.deepstack_merger_list.{i}.", Dv * v.merge_unit, "merge"))
    for name, lead, hf, dn, an in mergers:
        specs += norm(("vision", name, "norm"), hf + "norm", dn, an, layers=lead, bias=True)
        specs += merger_mlp(("vision", name), hf + "linear_fc1", hf + "linear_fc2", v, D, layers=lead)
    biased = ATTN_PROJ if cfg.text.attention_bias else ()
    return specs + decoder_specs(cfg, "model.language_model.", biased=biased, qk_norm=True)


def vision_forward(params: dict, inputs: dict, cfg: ModelConfig, opts):
    return _vision_tower(
        params,
        inputs["patches"],
        inputs["vision_segment_ids"],
        inputs["vision_pos"],
        inputs["vision_pos_taps"],
        inputs["vision_pos_weights"],
        cfg.vision,
        opts,
    )


def patch_inputs(grids, cfg: ModelConfig) -> dict:
    v = cfg.vision
    taps, weights = pos_embed_taps(grids, v.spatial_merge_size, v.num_grid_per_side)
    return {
        "vision_pos": vision_position_ids(grids, v.spatial_merge_size),
        "vision_pos_taps": taps,
        "vision_pos_weights": weights,
    }


def frame_grids(video_grid_thw) -> np.ndarray | None:
    """[sum t, 3]: every video grid (t, h, w) split into t grids (1, h, w) (one per temporal patch)."""
    if video_grid_thw is None:
        return None
    g = np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
    out = np.repeat(g, g[:, 0], axis=0)
    out[:, 0] = 1
    return out


def position_ids(
    input_ids, attention_mask, image_grid_thw, cfg: ModelConfig, mode: str, video_grid_thw=None, second_per_grid_ts=None
):
    """Qwen3-VL's M-RoPE ids: images as Qwen2-VL; each video frame (temporal patch) is a t = 1 grid of
    its own `<|video_pad|>` run (time lives in the text timestamps; `second_per_grid_ts` is unused)."""
    return mrope_positions_for(input_ids, attention_mask, image_grid_thw, cfg, mode, frame_grids(video_grid_thw))


FAMILY = Family(
    model_type="qwen3_vl",
    description="Qwen3-VL (dense)",
    parse_config=parse_config,
    param_specs=param_specs,
    vision_forward=vision_forward,
    patch_inputs=patch_inputs,
    position_ids=position_ids,
    hf_model_class="transformers.Qwen3VLForConditionalGeneration",
    hf_processor="transformers.models.qwen3_vl.processing_qwen3_vl.Qwen3VLProcessor",
)
