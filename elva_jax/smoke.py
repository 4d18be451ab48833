"""`python -m elva_jax.train`: the main entry point.

Until the training stack lands, the embedded default is a forward/embedding smoke run: it writes a
tiny random Qwen2-VL checkpoint (real Qwen2 vocabulary size), imports it, embeds a batch of text and
image rows, and decodes a few tokens from the KV cache, reporting compile time apart from run time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def smoke(run_dir: str, seed: int = 0) -> dict:
    from elva_jax.compare import _random_inputs
    from elva_jax.model import qwen2vl
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.embedding import last_token_embedding
    from elva_jax.model.hf_checkpoint import load_params
    from elva_jax.model.inputs import build_inputs
    from elva_jax.model.tiny import write_random_checkpoint

    ckpt = os.path.join(run_dir, "tiny_model")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        write_random_checkpoint(ckpt, "tiny", seed)
    cfg, params = load_params(ckpt)
    opts = ModelOptions()
    data = _random_inputs(cfg, seed)
    inputs = build_inputs(
        cfg, opts, data["input_ids"], data["attention_mask"], data["pixel_values"], data["image_grid_thw"]
    )

    @jax.jit
    def embed(p, x):
        return last_token_embedding(qwen2vl.forward(p, x, cfg, opts).hidden, x["attention_mask"])

    t0 = time.perf_counter()
    compiled = embed.lower(params, inputs).compile()
    t1 = time.perf_counter()
    e = jax.block_until_ready(compiled(params, inputs))
    t2 = time.perf_counter()
    B, P = data["input_ids"].shape
    cache = qwen2vl.init_cache(cfg, B, P + 8, dtype=jnp.float32)
    out, cache = jax.jit(lambda p, x, c: qwen2vl.prefill(p, x, c, cfg, opts))(params, inputs, cache)
    step = jax.jit(lambda p, t, c: qwen2vl.decode_step(p, t, c, cfg, opts))
    tok, toks = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), []
    for _ in range(8):
        toks.append(np.asarray(tok))
        _, logits, cache = step(params, tok, cache)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
    sims = np.asarray(e @ e.T)
    return {
        "checkpoint": ckpt,
        "embeddings": list(e.shape),
        "cosine_matrix": np.round(sims, 3).tolist(),
        "compile_s": round(t1 - t0, 3),
        "embed_step_s": round(t2 - t1, 4),
        "greedy_tokens": np.stack(toks, 1).tolist(),
    }


def main(argv=None) -> None:
    import yaml

    from elva_jax import configlib
    from elva_jax.train.config import RunConfig

    ap = argparse.ArgumentParser(prog="python -m elva_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML preset (configs/*.yaml); default: the tiny CPU preset")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.dir=/tmp/run")
    a = ap.parse_args(argv)
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.yaml")
    path = a.config or (default if os.path.exists(default) else None)
    try:
        cfg = configlib.load(RunConfig, path, a.overrides)
    except configlib.ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(configlib.to_dict(cfg), f, sort_keys=False)
    res = smoke(run_dir, cfg.train.seed)
    with open(os.path.join(run_dir, "smoke.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))
    print(f"resolved config: {os.path.join(run_dir, 'config.yaml')}; results: {os.path.join(run_dir, 'smoke.json')}")


if __name__ == "__main__":
    main()
