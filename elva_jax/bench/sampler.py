"""W2: sampling throughput, elva_jax's sampler vs transformers `generate`, side by side in one process.

    python -m elva_jax.bench.sampler [--reps 3] [--reference ../shared/bench/torch_reference.py]

Workload (docs/performance.md): the "small" Qwen2-VL, 16 prompts of 32 tokens, 32 new tokens, temperature 1,
full vocabulary (no top-k / top-p), no early stop. Reports median tokens/s of each and the ratio; the
JAX compile time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from elva_jax.bench.train_step import _reference_model, default_reference, torch_module
from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.params import init_params
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.model.tiny import preset_config


def jax_tokens_per_s(B: int, L: int, new: int, reps: int, dtype: str) -> dict:
    cfg = preset_config("small")
    opts = ModelOptions(dtype=dtype, param_dtype=dtype)
    params = init_params(cfg, jax.random.key(0), dtype=dtype)
    ids = np.random.default_rng(0).integers(0, 150000, (B, L))
    inputs = jax.device_put(build_inputs(cfg, opts, ids, None))
    scfg = SamplerConfig(max_new_tokens=new, temperature=1.0, cache_dtype=dtype)
    fn = jax.jit(lambda p, x, k: generate(p, x, k, cfg, opts, scfg, num_samples=1, stop_ids=(), ret_id=0, pad_id=0))
    t = time.perf_counter()
    compiled = fn.lower(params, inputs, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(params, inputs, jax.random.key(1)))
    ts = []
    for r in range(reps):
        t = time.perf_counter()
        out = compiled(params, inputs, jax.random.key(2 + r))
        jax.block_until_ready(out.tokens)
        ts.append(time.perf_counter() - t)
    assert int(np.asarray(out.mask).sum()) == B * new
    return {"tokens_per_s": B * new / statistics.median(ts), "compile_s": compile_s}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.bench.sampler", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reference", default=default_reference())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    res = {"workload": "W2", "device": jax.devices()[0].device_kind, "dtype": a.dtype}
    mod = torch_module(a.reference) if a.reference else None
    if mod is not None:
        model = _reference_model(mod).eval()
        ref = statistics.median(mod.generate_tps(model) for _ in range(a.reps))
        res["torch_tokens_per_s"] = round(ref, 1)
    got = jax_tokens_per_s(16, 32, 32, a.reps, a.dtype)
    res["elva_jax_tokens_per_s"] = round(got["tokens_per_s"], 1)
    res["compile_s"] = round(got["compile_s"], 2)
    if mod is not None:
        res["speedup_vs_torch"] = round(got["tokens_per_s"] / ref, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
