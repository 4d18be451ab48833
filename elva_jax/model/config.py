"""The architecture description every backbone family shares, read from a transformers `config.json`.

`ModelConfig` holds the text decoder (`TextConfig`), the vision tower (`VisionConfig`, or a family's
subclass of it), special-token ids and the `model_type` that selects the family; each family's
parser (`elva_jax.model.families`) fills it. Every size comes from the file; nothing is hard-coded
for a model size. `ModelOptions` says how the model runs (dtypes, positions, remat).
"""

from __future__ import annotations

import dataclasses
import json

from elva_jax.errors import UserError


class UnsupportedArchitectureError(UserError, ValueError):
    """The checkpoint is not a model family (or a variant of one) this package implements."""


class ModelFileNotFound(UserError, FileNotFoundError):
    """No config.json where a model directory was named."""


#: OpenAI CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD): Qwen2-VL, Qwen2.5-VL
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """How the family's image processor turns pixels into patches: sizes and normalisation.

    A patch is ``in_channels * temporal_patch_size * patch_size**2`` values; images are resized to
    multiples of ``factor = patch_size * merge_size``; ``merge_size**2`` patches make one visual token.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    video_rule: str = "stride"

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


#: Qwen2-VL's processor (the default where no model config is at hand, e.g. data-only tools)
DEFAULT_GEOMETRY = PatchGeometry()


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
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def geometry(self) -> PatchGeometry:
        return PatchGeometry(
            self.patch_size,
            self.spatial_merge_size,
            self.temporal_patch_size,
            self.in_channels,
            self.image_mean,
            self.image_std,
        )

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
    attention_bias: bool = True  # q/k/v projections carry biases (Qwen2 / Qwen2.5: yes; Qwen3: no)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    mrope_interleaved: bool = False  # M-RoPE frequencies interleaved t,h,w,t,h,w... (Qwen3-VL)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen2_vl"  # selects the family (vision tower, param table, positions) in `families`
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def with_vocab_size(self, vocab_size: int) -> ModelConfig:
        raw = json.loads(json.dumps(self.raw))
        if "text_config" in raw:
            raw["text_config"]["vocab_size"] = vocab_size
        raw["vocab_size"] = vocab_size
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab_size=vocab_size), raw=raw)


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
    vocab: the generation vocabulary: () scores every token; else the LM head scores only these ids
        and gives every other token the logit -1e9, so decoding is constrained to them and log-probs are
        under the constrained distribution (log_softmax over the subset). Embeddings are unaffected.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    position_mode: str = "mrope"
    remat: bool = False
    scan_unroll: int = 1
    matmul_precision: str = "default"
    vocab: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelOptions.{name} must be float32|bfloat16|float16")
        if self.position_mode not in ("mrope", "1d"):
            raise ValueError(f"ModelOptions.position_mode must be 'mrope' or '1d', got {self.position_mode!r}")
        if self.matmul_precision not in ("default", "high", "highest"):
            raise ValueError("ModelOptions.matmul_precision must be default|high|highest")
