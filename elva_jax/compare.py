"""Numerics reproducer: elva_jax vs transformers' PyTorch Qwen2-VL on the same checkpoint and inputs.

    python -m elva_jax.compare --hf-dir DIR [--inputs FILE.npz] [--dtype float32|bfloat16]
                               [--position-mode mrope|1d] [--per-layer] [--tol X]

FILE.npz holds transformers' conventions: input_ids [B, L], attention_mask [B, L], optional
pixel_values [n_patches, 1176] and image_grid_thw [n_images, 3] (mm_token_type_ids is derived).
Without --inputs, a seeded random batch (text rows and image rows, left padded) is made for the
checkpoint's vocabulary. The reference always runs in float32 (so --dtype bfloat16 measures elva_jax's
bf16 error against the exact model). Errors are ||jax - ref|| / ||ref|| over non-padding positions.
In mrope mode transformers computes its own position ids (its `get_rope_index`); in 1d mode both sides
get one running position per real token on all three axes. Prints one JSON object; exit status 1
when --tol is given and any error exceeds it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _random_inputs(cfg, seed: int) -> dict[str, np.ndarray]:
    """Two text rows and two image rows (one with two images), left padded."""
    rng = np.random.default_rng(seed)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    pool = np.array([i for i in range(min(cfg.text.vocab_size, 151643)) if i not in special])
    m = cfg.vision.spatial_merge_size
    rows, grids = [], []
    for kind in ("text", "image", "text", "images"):
        s = list(rng.choice(pool, rng.integers(5, 20)))
        n_img = {"text": 0, "image": 1, "images": 2}[kind]
        for _ in range(n_img):
            g = (1, int(rng.integers(1, 4)) * m * 2, int(rng.integers(1, 4)) * m)
            s += [cfg.vision_start_token_id] + [cfg.image_token_id] * (g[1] * g[2] // m**2)
            s += [cfg.vision_end_token_id] + list(rng.choice(pool, rng.integers(1, 6)))
            grids.append(g)
        rows.append(s)
    L = max(map(len, rows))
    ids = np.zeros((len(rows), L), np.int64)
    am = np.zeros_like(ids)
    for b, s in enumerate(rows):
        ids[b, L - len(s) :], am[b, L - len(s) :] = s, 1
    g = np.array(grids, np.int64)
    pv = rng.standard_normal((int(np.prod(g, 1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_grid_thw": g}


def _load_inputs(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    for k in ("input_ids",):
        if k not in data:
            raise SystemExit(f"{path}: missing key {k!r} (have {sorted(data)})")
    data.setdefault("attention_mask", np.ones_like(data["input_ids"]))
    if ("pixel_values" in data) != ("image_grid_thw" in data):
        raise SystemExit(f"{path}: pixel_values and image_grid_thw must be given together")
    return data


def _rel(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(hf_dir: str, data: dict, dtype: str, position_mode: str, per_layer: bool) -> dict:
    try:
        import torch
        import transformers
    except ImportError:
        raise SystemExit("elva_jax.compare needs the PyTorch reference: pip install 'elva_jax[reference]'") from None
    import jax

    from elva_jax.model import qwen2vl
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.embedding import last_token_embedding
    from elva_jax.model.hf_checkpoint import load_params
    from elva_jax.model.inputs import build_inputs
    from elva_jax.model.rope import linear_position_ids

    opts = ModelOptions(dtype=dtype, param_dtype=dtype, position_mode=position_mode, matmul_precision="highest")
    cfg, params = load_params(hf_dir, dtype=dtype)
    ids, am = data["input_ids"].astype(np.int64), data["attention_mask"].astype(np.int64)
    pv, grid = data.get("pixel_values"), data.get("image_grid_thw")

    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), output_hidden_states=True)
    if pv is not None:
        kw.update(
            pixel_values=torch.tensor(pv, dtype=torch.float32),
            image_grid_thw=torch.tensor(grid, dtype=torch.long),
            mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
        )
    if position_mode == "1d":
        kw["position_ids"] = torch.tensor(linear_position_ids(am).astype(np.int64))
    with torch.no_grad():
        out = ref(**kw)
    ref_hidden = out.hidden_states[-1].float().numpy()
    ref_logits = out.logits.float().numpy()

    inputs = build_inputs(cfg, opts, ids, am, pv, grid)
    fn = jax.jit(lambda p, x: qwen2vl.forward(p, x, cfg, opts, with_logits=True, return_layers=per_layer))
    got = fn(params, inputs)
    mask = am.astype(bool)
    last = np.max(np.where(mask, np.arange(ids.shape[1]), -1), axis=1)
    ref_emb = ref_hidden[np.arange(len(ids)), last]
    ref_emb = ref_emb / np.linalg.norm(ref_emb, axis=-1, keepdims=True)
    errors = {
        "last_hidden_state": _rel(got.hidden, ref_hidden, mask),
        "logits": _rel(got.logits, ref_logits, mask),
        "embedding": _rel(last_token_embedding(got.hidden, am), ref_emb),
    }
    result = {
        "hf_dir": hf_dir,
        "dtype": dtype,
        "reference_dtype": "float32",
        "position_mode": position_mode,
        "batch": list(ids.shape),
        "n_images": 0 if grid is None else int(len(grid)),
        "errors": errors,
        "max_abs_logit_diff": float(np.abs(np.asarray(got.logits) - ref_logits)[mask].max()),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "jax": jax.__version__},
    }
    if per_layer:
        result["per_layer"] = [
            _rel(got.layers[i], out.hidden_states[i].float().numpy(), mask) for i in range(cfg.text.num_layers)
        ]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True, help="transformers Qwen2-VL checkpoint directory")
    ap.add_argument("--inputs", help="npz with input_ids, attention_mask[, pixel_values, image_grid_thw]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random batch used without --inputs")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--position-mode", choices=["mrope", "1d"], default="mrope")
    ap.add_argument("--per-layer", action="store_true", help="also report the error at each decoder layer input")
    ap.add_argument("--tol", type=float, help="exit 1 if any relative error exceeds this")
    a = ap.parse_args(argv)
    from elva_jax.model.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_file(a.hf_dir)
    data = _load_inputs(a.inputs) if a.inputs else _random_inputs(cfg, a.seed)
    res = run(a.hf_dir, data, a.dtype, a.position_mode, a.per_layer)
    worst = max(list(res["errors"].values()) + res.get("per_layer", []))
    res["max_error"] = worst
    if a.tol is not None:
        res["tol"] = a.tol
        res["pass"] = worst <= a.tol
    print(json.dumps(res))
    return 1 if (a.tol is not None and worst > a.tol) else 0


if __name__ == "__main__":
    sys.exit(main())
