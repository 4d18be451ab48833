"""Random Qwen2-VL checkpoints of any size, written in transformers' format without torch.

Used by the embedded default run (a tiny model on the real Qwen2 tokenizer's vocabulary) and by
benchmarks ("small"). Nothing is downloaded: real weights are for users' machines.

    python -m elva_jax.model.tiny --out DIR [--preset tiny|small] [--seed 0]
"""

from __future__ import annotations

import argparse
import re

import jax

from elva_jax.errors import cli
from elva_jax.model.config import ModelConfig
from elva_jax.model.families import parse_model_config
from elva_jax.model.hf_checkpoint import save_params
from elva_jax.model.params import count_params, init_params

QWEN2VL_VOCAB = 151936  # Qwen2-VL's padded vocabulary: room for added tokens such as <emb> and [RET]

PRESETS = {
    # a few seconds per step on a laptop CPU; tied embeddings keep it at ~10M parameters
    "tiny": dict(
        vocab_size=QWEN2VL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=True,
        vision_depth=2,
        vision_embed_dim=32,
        vision_num_heads=2,
    ),
    # Qwen2-VL's published sizes (the hub checkpoints' config.json): for planning, never for random runs
    "qwen2vl_2b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        mrope_section=[16, 24, 24],
        tie_word_embeddings=True,
        vision_depth=32,
        vision_embed_dim=1280,
        vision_num_heads=16,
    ),
    "qwen2vl_7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        mrope_section=[16, 24, 24],
        tie_word_embeddings=False,
        vision_depth=32,
        vision_embed_dim=1280,
        vision_num_heads=16,
    ),
    # the benchmarks' "small" model (about 183M parameters, untied; docs/performance.md)
    "small": dict(
        vocab_size=151669,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        mrope_section=[8, 12, 12],
        tie_word_embeddings=False,
        vision_depth=4,
        vision_embed_dim=256,
        vision_num_heads=4,
    ),
}


def config_dict(
    *,
    vocab_size,
    hidden_size,
    intermediate_size,
    num_hidden_layers,
    num_attention_heads,
    num_key_value_heads,
    mrope_section,
    tie_word_embeddings,
    vision_depth,
    vision_embed_dim,
    vision_num_heads,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
) -> dict:
    """A transformers 5.x Qwen2-VL config.json as a dict."""
    return {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "text_config": {
            "model_type": "qwen2_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": rms_norm_eps,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": vision_depth,
            "embed_dim": vision_embed_dim,
            "hidden_size": hidden_size,
            "num_heads": vision_num_heads,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "hidden_act": "quick_gelu",
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _text(vocab, hidden, inter, layers, heads, kv, section, theta, **extra) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section), **extra},
    )


_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def qwen2_5_vl_config_dict(*, tie, text: dict, depth, dim, heads, inter, window=112, fullatt=(), **_) -> dict:
    """A transformers 5.x Qwen2.5-VL config.json as a dict (as `Qwen2_5_VLConfig.to_dict()` nests it)."""
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": {"model_type": "qwen2_5_vl_text", **text},
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": depth,
            "hidden_size": dim,
            "intermediate_size": inter,
            "num_heads": heads,
            "out_hidden_size": text["hidden_size"],
            "hidden_act": "silu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "window_size": window,
            "fullatt_block_indexes": list(fullatt),
            "tokens_per_second": 2,
        },
        "tie_word_embeddings": tie,
        **_TOKENS,
    }


def qwen3_vl_config_dict(*, tie, text: dict, depth, dim, heads, inter, n_pos, deepstack, head_dim, **_) -> dict:
    """A transformers 5.x Qwen3-VL (dense) config.json as a dict."""
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "text_config": {"model_type": "qwen3_vl_text", "head_dim": head_dim, "attention_bias": False, **text},
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": depth,
            "hidden_size": dim,
            "intermediate_size": inter,
            "num_heads": heads,
            "out_hidden_size": text["hidden_size"],
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "num_position_embeddings": n_pos,
            "deepstack_visual_indexes": list(deepstack),
        },
        "tie_word_embeddings": tie,
        **_TOKENS,
    }


#: presets of the newer families: (family config builder, its arguments)
FAMILY_PRESETS = {
    # tiny random models of the same scale as "tiny", one per family (CPU runs and tests)
    "tiny_qwen2_5_vl": (
        qwen2_5_vl_config_dict,
        dict(
            tie=True,
            text=_text(QWEN2VL_VOCAB, 64, 128, 2, 4, 2, (2, 3, 3), 1e6),
            depth=2,
            dim=32,
            heads=2,
            inter=64,
            window=56,  # 2 x 2 merged tokens per window: several windows per image
            fullatt=(1,),
        ),
    ),
    "tiny_qwen3_vl": (
        qwen3_vl_config_dict,
        dict(
            tie=True,
            text=_text(QWEN2VL_VOCAB, 64, 128, 2, 4, 2, (3, 3, 2), 5e6, mrope_interleaved=True),
            head_dim=16,
            depth=2,
            dim=32,
            heads=2,
            inter=64,
            n_pos=16,
            deepstack=(0,),
        ),
    ),
    # Qwen3-VL-2B / -8B published sizes (also Qwen3-VL-Embedding-2B / -8B): planning only
    "qwen3vl_2b": (
        qwen3_vl_config_dict,
        dict(
            tie=True,
            text=_text(151936, 2048, 6144, 28, 16, 8, (24, 20, 20), 5e6, mrope_interleaved=True),
            head_dim=128,
            depth=24,
            dim=1024,
            heads=16,
            inter=4096,
            n_pos=2304,
            deepstack=(5, 11, 17),
        ),
    ),
    "qwen3vl_8b": (
        qwen3_vl_config_dict,
        dict(
            tie=False,
            text=_text(151936, 4096, 12288, 36, 32, 8, (24, 20, 20), 5e6, mrope_interleaved=True),
            head_dim=128,
            depth=27,
            dim=1152,
            heads=16,
            inter=4304,
            n_pos=2304,
            deepstack=(8, 16, 24),
        ),
    ),
}


#: the presets a run may initialise at random (`model.random_preset` and the Embed-RL models' presets): the
#: tiny ones and "small"; the full-size ones (qwen2vl_7b, ...) are sizes for planning, not random runs
RANDOM_PRESETS = ("tiny", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small")


def preset_for_checkpoint_name(path: str) -> tuple[str, str] | None:
    """(preset, its published name) of the full-size preset a checkpoint's name points at
    ("Qwen/Qwen2-VL-7B-Instruct" -> ("qwen2vl_7b", "Qwen2-VL-7B"), ".../Qwen3-VL-Embedding-8B" -> ("qwen3vl_8b",
    "Qwen3-VL-8B"), "runs/qwen2vl_2b_nli/export" -> ("qwen2vl_2b", "Qwen2-VL-2B")), or None: what a memory plan
    uses when the weights are not on this host."""
    low = path.lower()
    qwen3 = re.search(r"qwen-?3", low)
    sizes, prefix, title = (("2", "8"), "qwen3vl", "Qwen3-VL") if qwen3 else (("2", "7"), "qwen2vl", "Qwen2-VL")
    m = re.search(rf"(?<![0-9.])({'|'.join(sizes)})b(?![a-z0-9])", low)
    return (f"{prefix}_{m.group(1)}b", f"{title}-{m.group(1)}B") if m else None


def preset_names() -> list[str]:
    return sorted([*PRESETS, *FAMILY_PRESETS])


def preset_config_dict(name: str) -> dict:
    if name in PRESETS:
        return config_dict(**PRESETS[name])
    if name in FAMILY_PRESETS:
        build, kw = FAMILY_PRESETS[name]
        return build(**kw)
    raise ValueError(f"unknown model preset {name!r}; choose from {preset_names()}")


def preset_config(name: str) -> ModelConfig:
    return parse_model_config(preset_config_dict(name), source=f"preset:{name}")


def write_random_checkpoint(path: str, preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> ModelConfig:
    cfg = preset_config(preset)
    params = init_params(cfg, jax.random.key(seed), dtype=dtype)
    save_params(path, params, cfg)
    return cfg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.model.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny", choices=preset_names())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    cfg = write_random_checkpoint(a.out, a.preset, a.seed, a.dtype)
    n = count_params(init_params(cfg, jax.random.key(0)))
    print(f"wrote a random {a.preset} {cfg.model_type} ({n / 1e6:.1f}M parameters) to {a.out}")


if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.model.tiny")
