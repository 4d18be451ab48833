"""Qwen2-VL architecture description, read from a transformers `config.json`.

Both layouts seen in the wild are accepted: transformers 5.x (nested `text_config` with
`rope_parameters`) and the flat 4.x hub layout (`rope_scaling.mrope_section`, top-level `rope_theta`).
Every size comes from the file; nothing is hard-coded for a model size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not a Qwen2-VL model this package implements."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    out_hidden_size: int  # merger output = LLM hidden size
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    hidden_act: str = "silu"
    head_dim_override: int | None = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def with_vocab_size(self, vocab_size: int) -> Qwen2VLConfig:
        raw = json.loads(json.dumps(self.raw))
        if "text_config" in raw:
            raw["text_config"]["vocab_size"] = vocab_size
        raw["vocab_size"] = vocab_size
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab_size=vocab_size), raw=raw)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> Qwen2VLConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise UnsupportedArchitectureError(
                f"{source}: model_type={mt!r} (architectures={archs}) is not supported; "
                f"elva_jax implements {SUPPORTED_MODEL_TYPES} (Qwen2-VL)."
            )
        t = dict(d.get("text_config") or {})
        flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        # 4.x hub configs keep the text fields at the top level; 5.x nests them.
        for k, v in flat.items():
            t.setdefault(k, v)
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
            )
        except KeyError as e:
            raise UnsupportedArchitectureError(f"{source}: text config is missing {e}") from None
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
        if text.hidden_act != "silu" or vision.hidden_act != "quick_gelu":
            raise UnsupportedArchitectureError(
                f"{source}: activations {text.hidden_act}/{vision.hidden_act} are not supported"
            )
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise UnsupportedArchitectureError(
                f"{source}: mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}"
            )
        if vision.out_hidden_size != text.hidden_size:
            raise UnsupportedArchitectureError(
                f"{source}: vision merger outputs {vision.out_hidden_size}, LLM hidden is {text.hidden_size}"
            )
        tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=tie,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            raw=d,
        )

    @classmethod
    def from_file(cls, path: str) -> Qwen2VLConfig:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, source=path)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model runs (not what it is).

    dtype: compute dtype of activations and matmuls ("float32" | "bfloat16").
    param_dtype: storage dtype of the params pytree (e.g. fp32 master weights with bf16 compute).
    position_mode: "mrope" (Qwen2-VL's 3-D positions from `get_rope_index`) or "1d" (one position per
        token for every token, images included: what LamRA-trained checkpoints expect).
    remat: rematerialise each decoder/vision layer in the backward pass.
    scan_unroll: layers per `lax.scan` iteration (1: smallest program, fastest compile; the layer
        count: fully unrolled, no per-layer slicing of stacked weights; faster steps for small models).
    matmul_precision: passed to `jax.lax.dot_general` ("default" | "high" | "highest").
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    position_mode: str = "mrope"
    remat: bool = False
    scan_unroll: int = 1
    matmul_precision: str = "default"

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelOptions.{name} must be float32|bfloat16|float16")
        if self.position_mode not in ("mrope", "1d"):
            raise ValueError(f"ModelOptions.position_mode must be 'mrope' or '1d', got {self.position_mode!r}")
        if self.matmul_precision not in ("default", "high", "highest"):
            raise ValueError("ModelOptions.matmul_precision must be default|high|highest")
