"""The model, mesh and optimizer sections of the run schema (the `lora` section is `model.lora.LoraConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from elva_jax.configlib import FINGERPRINT_ALL
from elva_jax.model.tiny import RANDOM_PRESETS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None  # None: no clipping (LamRA)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # transformers directory of a supported family; "" = a random model of `random_preset`
    checkpoint: str = field(default="", metadata={"fingerprint": FINGERPRINT_ALL})
    # random model presets (elva_jax.model.tiny): "tiny" (Qwen2-VL), "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small"
    random_preset: str = field(default="tiny", metadata={"choices": RANDOM_PRESETS, "fingerprint": FINGERPRINT_ALL})
    tokenizer: str = ""  # directory with tokenizer files; "" = the checkpoint's, else the bundled Qwen2 files
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})  # compute
    param_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})  # master weights
    position_mode: str = field(default="mrope", metadata={"choices": ("mrope", "1d")})
    remat: bool = False
    # the generation vocabulary (summaries, the SFT targets' log-probs, RL rollouts, eval's [RET] summaries):
    # () = every token; else only these words (each with and without a leading space), "," and " ", [RET]
    # and <|im_end|> can be generated (`elva_jax.data.tokenize.generation_vocab`). A sampler option for
    # models whose LM head is not trained to write (tiny random ones); real checkpoints leave it empty
    generation_words: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
