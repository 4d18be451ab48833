"""W1: the contrastive train step, elva_jax vs the PyTorch reference, side by side in one process.

    python -m elva_jax.bench.train_step [--reps 5] [--reference ../shared/bench/torch_reference.py]
                                        [--dtype float32|bfloat16] [--remat] [--lora RANK] [--profile DIR]

Workload (docs/performance.md): the "small" Qwen2-VL (random weights), full-parameter AdamW, 8 text
queries of 64 tokens + 8 image+text candidates of 64 tokens (one 8x8-patch image = 16 image tokens
each), InfoNCE tau 0.05 on the last token's embedding. Both sides warm up first (JAX compile time is
reported apart); the median of `reps` steps is reported, with the ratio, XLA's FLOPs per step and
the achieved FLOP/s against the matmul peak measured here (jnp.dot of 2048^2 fp32).

``--lora RANK``: the LoRA step instead (frozen base, LoRA rank RANK, alpha 2 * RANK, on
every decoder linear of the LLM, AdamW on the adapters only), against the same reference model
wrapped by peft with the same LoRA config (`elva_jax.bench.rl_step_torch.lora_model`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.bench.profile_ops import hlo_categories, summarize, torch_profile, xla_op_times
from elva_jax.contrastive.step import StepConfig, TrainState, split_lm_head, train_step
from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.lora import LORA_TARGETS, LoraConfig, init_lora
from elva_jax.model.params import init_params
from elva_jax.model.tiny import preset_config
from elva_jax.runtime.observe import lowered_flops, unrolled


def jax_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def make_batch(cfg, opts, B=8, L=64, grid_hw=8, seed=0):
    rng = np.random.default_rng(seed)
    n_img = grid_hw * grid_hw // 4
    ids = rng.integers(0, 150000, (B, L))
    ids_img = np.concatenate(
        [
            rng.integers(0, 150000, (B, 4)),
            np.full((B, 1), cfg.vision_start_token_id),
            np.full((B, n_img), cfg.image_token_id),
            np.full((B, 1), cfg.vision_end_token_id),
            rng.integers(0, 150000, (B, L - 6 - n_img)),
        ],
        1,
    )
    pv = rng.standard_normal((B * grid_hw * grid_hw, cfg.vision.patch_dim)).astype(np.float32)
    grid = np.array([[1, grid_hw, grid_hw]] * B)
    q = build_inputs(cfg, opts, ids, None)
    c = build_inputs(cfg, opts, ids_img, None, pv, grid, rows=B, row_len=grid_hw * grid_hw)
    return {"query": jax.tree.map(lambda x: x[None], q), "cand": jax.tree.map(lambda x: x[None], c)}


def jax_step_time(
    dtype: str, remat: bool, reps: int, scan_unroll: int = 1, lora_rank: int = 0, profile_dir: str = ""
) -> dict:
    """elva_jax's step: full fine-tuning, or (``lora_rank`` > 0) LoRA on the LLM with a frozen base.
    ``profile_dir``: also trace ``reps`` more steps there and summarise them op by op (`profile_ops`)."""
    cfg = preset_config("small")
    opts = ModelOptions(dtype=dtype, param_dtype="float32", remat=remat, scan_unroll=scan_unroll)
    params = init_params(cfg, jax.random.key(0))
    tx = optax.adamw(1e-5)
    lcfg = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank else None
    lora = init_lora(cfg, lcfg, jax.random.key(2)) if lcfg else None
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        lora,
        tx.init(lora if lcfg else split_lm_head(params)[0]),
        jax.random.key(1),
        jnp.zeros((), jnp.int32),
    )
    scfg = StepConfig(tau=0.05, embedding="last", full_finetune=lcfg is None, lora_scale=lcfg.scale if lcfg else 1.0)
    batch = jax.device_put(make_batch(cfg, opts))
    fn = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, opts=opts, scfg=scfg, tx=tx), donate_argnums=(0,))
    t = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    opts_u = unrolled(opts, cfg)  # XLA counts a scan body once: count FLOPs on the unrolled program
    flops = lowered_flops(jax.jit(lambda s, b: train_step(s, b, cfg=cfg, opts=opts_u, scfg=scfg, tx=tx)), state, batch)
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m["loss"])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state.step, m["loss"]))
        ts.append(time.perf_counter() - t)
    out = {"step_s": statistics.median(ts), "compile_s": compile_s, "flops_per_step": flops, "loss": float(m["loss"])}
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(reps):
                state, m = compiled(state, batch)
                jax.block_until_ready((state.step, m["loss"]))
        cats = hlo_categories(compiled.as_text())
        out["profile"] = summarize(xla_op_times(profile_dir, only=cats), cats, reps)
    return out


def default_reference() -> str:
    """../shared/bench/torch_reference.py next to the repository (where CI and developers have it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "bench", "torch_reference.py"))


def _reference_model(mod):
    """The reference module's "small" model, built by transformers' auto class from its config."""
    import transformers  # local: the PyTorch model classes (heavy), needed by the reference only

    return transformers.AutoModelForImageTextToText.from_config(mod.small_config())


def torch_module(ref_path: str):
    """The PyTorch reference script as a module, or None when it is not there."""
    if not os.path.exists(ref_path):
        return None
    spec = importlib.util.spec_from_file_location("torch_reference", ref_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torch_step_time(ref_path: str, reps: int, lora_rank: int = 0, profile: bool = False) -> dict | None:
    mod = torch_module(ref_path)
    if mod is None:
        return None
    import torch  # local: heavy optional dependency, needed by the reference only

    model = _reference_model(mod)
    if lora_rank:  # peft injects the adapters in place and freezes the base; AdamW skips frozen params
        from elva_jax.bench.rl_step_torch import lora_model  # local: imports torch (and peft when called)

        lora_model(model, rank=lora_rank, alpha=2.0 * lora_rank, targets=LORA_TARGETS)
    model.train()
    out = {
        "step_s": mod.train_step_time(model, reps=reps),
        "peak_gflops_torch": mod.peak_gflops(),
        "torch": torch.__version__,
    }
    if profile:  # the reference's timing function runs a warm-up step, then the timed one: 2 steps
        out["profile"] = torch_profile(lambda: mod.train_step_time(model, reps=1), steps=2)
    return out


def main(argv=None) -> None:
    default_ref = default_reference()
    ap = argparse.ArgumentParser(prog="python -m elva_jax.bench.train_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference", default=default_ref, help="path of torch_reference.py ('' to skip)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration (8 = fully unrolled)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank: the LoRA step (frozen base); 0: full fine-tuning")
    ap.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="also trace --reps steps of each side (jax.profiler into DIR, torch.profiler) and print where the "
        "time goes: per-op self time by category (matmul / elementwise / data movement ...) and the top ops",
    )
    a = ap.parse_args(argv)
    peak = jax_matmul_peak()
    res = {
        "workload": "W1",
        "device": jax.devices()[0].device_kind,
        "dtype": a.dtype,
        "trained": f"LoRA rank {a.lora} alpha {2 * a.lora}, LLM decoder linears" if a.lora else "all parameters",
        "peak_gflops_jax": round(peak / 1e9, 1),
    }
    ref = torch_step_time(a.reference, a.reps, a.lora, bool(a.profile)) if a.reference else None
    got = jax_step_time(a.dtype, a.remat, a.reps, a.scan_unroll, a.lora, a.profile)
    res["elva_jax_step_s"] = round(got["step_s"], 4)
    res["compile_s"] = round(got["compile_s"], 2)
    if got["flops_per_step"]:
        res["gflops_per_step"] = round(got["flops_per_step"] / 1e9, 2)
        res["achieved_gflops"] = round(got["flops_per_step"] / got["step_s"] / 1e9, 1)
        res["fraction_of_peak"] = round(got["flops_per_step"] / got["step_s"] / peak, 3)
    if ref:
        res["torch_step_s"] = round(ref["step_s"], 4)
        res["peak_gflops_torch"] = round(ref["peak_gflops_torch"], 1)
        res["speedup_vs_torch"] = round(ref["step_s"] / got["step_s"], 2)
    if a.profile:
        prof = got["profile"]
        matmul_s = prof["op_time_per_step_s"] * prof["categories"]["matmul"]
        if got["flops_per_step"] and matmul_s:  # the rate inside the matmuls: is it the matmuls or the rest?
            prof["gflops_inside_matmuls"] = round(got["flops_per_step"] / matmul_s / 1e9, 1)
        res["profile_elva_jax"] = prof
        if ref:
            res["profile_torch"] = ref["profile"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
