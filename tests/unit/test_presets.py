"""Every YAML preset in configs/ loads through the typed schema (misspelt keys would fail here)."""

from __future__ import annotations

import glob
import os

import pytest

from elva_jax import configlib
from elva_jax.schema import RunConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))


def test_presets_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny_cpu.yaml", "qwen2vl_2b_nli.yaml", "qwen2vl_7b_mbeir.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_preset_loads(path):
    cfg = configlib.load(RunConfig, path)
    # LamRA's tau 0.05; the presets that continue Qwen3-VL-Embedding use its scoring temperature 0.02
    tau = 0.02 if cfg.train.embedding == "instruct_last" else 0.05
    assert cfg.train.tau == tau and set(cfg.train.stages) <= {"sft", "contrastive", "rl"}


def _preset(name):
    return configlib.load(RunConfig, [p for p in CONFIGS if p.endswith(name)][0])


@pytest.mark.parametrize("size", ["7b", "2b"])
def test_reference_hyperparameters(size):
    """Stage 1: the paper preset ships the paper's LR 4e-5, the LamRA preset LamRA's code's 2e-4; the rest equal."""
    nli, lamra = _preset(f"qwen2vl_{size}_nli.yaml"), _preset(f"qwen2vl_{size}_nli_lamra.yaml")
    assert (nli.train.global_batch, nli.optim.lr, nli.train.epochs, nli.lora.rank, nli.lora.alpha) == (
        576,
        4e-5,
        2.0,
        64,
        128.0,
    )
    assert lamra.optim.lr == 2e-4
    a, b = configlib.to_dict(nli), configlib.to_dict(lamra)
    a["optim"].pop("lr"), b["optim"].pop("lr"), a["run"].pop("dir"), b["run"].pop("dir")
    assert a == b
    mb = configlib.load(RunConfig, [p for p in CONFIGS if p.endswith("qwen2vl_7b_mbeir.yaml")][0])
    assert (mb.train.global_batch, mb.optim.lr, mb.train.epochs, mb.lora.rank, mb.lora.alpha) == (
        960,
        1e-4,
        1.0,
        128,
        256.0,
    )
    assert mb.optim.warmup_ratio == 0.03 and mb.optim.clip_norm is None


def test_rl_preset_has_paper_values():
    rl = configlib.load(RunConfig, [p for p in CONFIGS if p.endswith("qwen2vl_7b_elva_rl.yaml")][0])
    r = rl.rl
    assert (r.group_size, r.beta, r.lr, r.num_hard_negatives, r.num_random_negatives, r.alpha, r.epsilon) == (
        8,
        0.2,
        1e-6,
        50,
        50,
        0.4,
        0.6,
    )
    assert rl.train.stages == ("rl",)


def test_every_open_rl_choice_reaches_the_step_and_rewards():
    """log_base, adv_scale and every TRL loss type are run-config fields read by the RL stage."""
    from elva_jax.rl.loop import rl_configs

    cfg = configlib.load(
        RunConfig, None, ["rl.log_base=2", "rl.adv_scale=batch", "rl.loss_type=dapo", "rl.kl_bias_correction=true"]
    )
    rcfg, reward = rl_configs(cfg)
    assert (rcfg.adv_scale, rcfg.loss_type, reward.log_base, rcfg.kl_bias_correction) == ("batch", "dapo", 2.0, True)
    with pytest.raises(configlib.ConfigError, match="rl.log_base"):
        configlib.load(RunConfig, None, ["rl.log_base=1"])
