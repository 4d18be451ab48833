"""LoRA adapters on the decoder's linear layers (the vision tower and merger stay frozen).

For a target W [in, out]: y = x W + (alpha / r) (x A) B with A [in, r] ~ kaiming-uniform (PEFT's
default, bound = 1/sqrt(in)) and B [r, out] = 0, so a fresh adapter leaves the model unchanged.
Adapters are stacked over layers like the base weights: A [L, in, r], B [L, r, out]. The reference
policy of the RL stage is the same base params with `lora=None`: no second copy of the weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from elva_jax.configlib import FINGERPRINT_ALL
from elva_jax.model.config import ModelConfig
from elva_jax.model.decoder import LORA_TARGETS
from elva_jax.model.params import get_path, param_specs


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters (also the run schema's ``lora`` section): rank r, alpha, the decoder linears they wrap.

    scale = alpha / r multiplies every adapter's output; it travels with this config."""

    # False: full fine-tuning of the LLM (vision tower and merger stay frozen)
    enabled: bool = dataclasses.field(default=True, metadata={"fingerprint": FINGERPRINT_ALL})
    rank: int = dataclasses.field(default=8, metadata={"fingerprint": FINGERPRINT_ALL})
    alpha: float = dataclasses.field(default=16.0, metadata={"fingerprint": FINGERPRINT_ALL})
    targets: tuple[str, ...] = dataclasses.field(default=LORA_TARGETS, metadata={"fingerprint": FINGERPRINT_ALL})
    # dropout on the LoRA branches' input in the contrastive stages' training forwards (PEFT's lora_dropout;
    # LamRA 0.05, set in the stage-1/2 presets). 0 here keeps the tiny presets deterministic. Never at eval or
    # export; not in the RL stage (it would change the log-probs GRPO's ratio and KL compare)
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora.targets: unknown LoRA targets {bad}; choose from {LORA_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"lora.rank = {self.rank} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout = {self.dropout!r} must be in [0, 1)")


def _kernel_specs(cfg: ModelConfig):
    return {s.path[2]: s for s in param_specs(cfg) if s.path[:2] == ("text", "layers") and s.path[3] == "kernel"}


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    specs = _kernel_specs(cfg)
    out = {}
    for k, t in zip(jax.random.split(key, len(lcfg.targets)), lcfg.targets):
        L, din, dout = specs[t].shape
        bound = 1.0 / din**0.5
        out[t] = {
            "a": jax.random.uniform(k, (L, din, lcfg.rank), jnp.float32, -bound, bound).astype(dtype),
            "b": jnp.zeros((L, lcfg.rank, dout), dtype),
        }
    return out


def lora_axes(cfg: ModelConfig, lcfg: LoraConfig) -> dict:
    """Logical axes of the adapters: A follows the kernel's input axis, B its output axis."""
    specs = _kernel_specs(cfg)
    return {
        t: {"a": ("layers", specs[t].axes[1], "lora_rank"), "b": ("layers", "lora_rank", specs[t].axes[2])}
        for t in lcfg.targets
    }


def merge_lora(params: dict, lora: dict, lcfg: LoraConfig) -> dict:
    """Params with W + scale * A B folded in (for export as a plain transformers checkpoint)."""
    layers = dict(params["text"]["layers"])
    for t, ab in lora.items():
        w = get_path(params, ("text", "layers", t, "kernel"))
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        layers[t] = {**layers[t], "kernel": (w.astype(jnp.float32) + lcfg.scale * delta).astype(w.dtype)}
    return {**params, "text": {**params["text"], "layers": layers}}
