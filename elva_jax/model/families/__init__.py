"""The backbone seam: one `Family` per transformers `model_type`, chosen from `config.json`.

A family owns what differs between Qwen-VL generations: its config parser, its table of tensors
(`ParamSpec`s: init, transformers import/export names, logical sharding axes), its vision tower, the
per-patch host inputs that tower needs, and its position-id rule. Everything else (token embedding,
the decoder with its KV cache, the LM head, sampling, embeddings) is shared and lives in
`elva_jax.model.backbone`, which asks `family_of(cfg)` for the family's parts.

Adding a family: one module here that builds a `Family`, one line in `_REGISTRY`, and tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

from elva_jax.model.config import ModelConfig, ModelFileNotFound, UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class Family:
    """The parts of one backbone family (all pure functions).

    parse_config(d, source) -> ModelConfig
    param_specs(cfg) -> list[ParamSpec]
    vision_forward(params_vision, inputs, cfg, opts) -> (features [n, D], valid [n] bool,
        deepstack features [k, n, D] or None): merged visual tokens of the packed patch rows.
    patch_inputs(grids, cfg) -> dict name -> [n_patches, ...] per-patch host arrays (in pixel_values
        order) that `inputs.pack_images` packs beside the patches (e.g. "vision_pos"); grids may have
        t > 1 (videos).
    position_ids(input_ids, attention_mask, image_grid_thw, cfg, mode, video_grid_thw=None,
        second_per_grid_ts=None) -> [3, B, L] int32 (host): the family's M-RoPE rule, videos included.
    alternate_prefixes: (on-disk prefix, alternative prefix) pairs accepted on import.
    hf_model_class / hf_image_processor: dotted paths of the transformers classes that are the family's
        PyTorch oracle (model) and image processor (used by `elva_jax.compare`).
    hf_processor: dotted path of the family's transformers processor (its video timestamps, when the
        geometry's video rule writes them, for `elva_jax.compare --video`).
    hf_video_kwargs: video inputs beyond pixel_values_videos / video_grid_thw that the transformers model
        takes (e.g. "second_per_grid_ts").
    """

    model_type: str
    description: str
    parse_config: Callable[[dict, str], ModelConfig]
    param_specs: Callable[[ModelConfig], list]
    vision_forward: Callable[..., Any]
    patch_inputs: Callable[[Any, ModelConfig], dict]
    position_ids: Callable[..., Any]
    alternate_prefixes: tuple[tuple[str, str], ...] = ()
    hf_model_class: str = ""
    hf_image_processor: str = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil"
    hf_processor: str = ""
    hf_video_kwargs: tuple[str, ...] = ()


# model_type -> module defining FAMILY (imported on first use)
_REGISTRY = {
    "qwen2_vl": "elva_jax.model.families.qwen2_vl",
    "qwen3_vl": "elva_jax.model.families.qwen3_vl",
    "qwen2_5_vl": "elva_jax.model.families.qwen2_5_vl",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def family_for_type(model_type, *, source: str = "<config>", architectures=None) -> Family:
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"{source}: model_type={model_type!r} (architectures={architectures}) is not supported; "
            f"elva_jax implements {supported_model_types()}."
        )
    return importlib.import_module(_REGISTRY[model_type]).FAMILY


def family_of(cfg: ModelConfig) -> Family:
    return family_for_type(cfg.model_type)


def parse_model_config(d: dict[str, Any], *, source: str = "<dict>") -> ModelConfig:
    """A config.json dict parsed by its `model_type`'s family."""
    family = family_for_type(d.get("model_type"), source=source, architectures=d.get("architectures"))
    return family.parse_config(d, source)


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json (or of that file)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ModelFileNotFound(f"no config.json at {path}")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise UnsupportedArchitectureError(f"{path}: invalid JSON ({e})") from None
    return parse_model_config(d, source=path)
