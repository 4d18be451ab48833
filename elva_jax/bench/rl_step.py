"""W4: one ELVA RL step on the "small" model, elva_jax vs its PyTorch reference, time split by phase.

    python -m elva_jax.bench.rl_step [--steps 3] [--side both|jax|torch] [--negatives 8] [--group-size 8]
                                     [--summary-tokens 16] [--micro-instances 0] [--row-chunk 72] [--data DIR]
                                     [--old-logp auto|recompute] [--ret-embedding sampler|recompute]
                                     [--cache-dtype compute|float32|bfloat16] [--compare-passes]

Workload (docs/performance.md): G = 8 rollouts, 1 positive + 8 negatives, 16-token summaries (no early stop
is forced: random weights rarely emit [RET], so summaries run to the budget), one instance per step
from the bundled multi-grain data (text and image sides), LoRA rank 16 / alpha 32 on every decoder
linear layer, AdamW. The reference (`elva_jax.bench.rl_step_torch`) runs the same step on the same
prompts with transformers' ``generate``, a teacher-forced pass, TRL's GRPO loss and peft's LoRA (same
config, its own random weights). Each side reports the median of the steps after the first (which
compiles / warms up), the per-phase split, the rollout's sampled tokens/s (for comparison with W2),
and the process's peak RSS; with both sides, the ratio reference / elva_jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.data.benchmarks import mbeir
from elva_jax.data.benchmarks.multigrain.generator import generate as generate_data
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.records import contrastive_records
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model.config import ModelOptions
from elva_jax.model.hf_checkpoint import resize_vocab
from elva_jax.model.lora import LoraConfig, init_lora
from elva_jax.model.params import init_params
from elva_jax.model.sampler import Samples
from elva_jax.model.tiny import preset_config
from elva_jax.rl.instances import add_random_negatives
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState, RLTrainer, encode_prompts

KEYS = ("time_rollout_s", "time_reforward_s", "time_reward_s", "time_update_s")
LORA_RANK, LORA_ALPHA, LR = 16, 32.0, 1e-5


def bench_instances(root: str, negatives: int, steps: int) -> list[dict]:
    """`steps` records of the bundled data with 1 positive + `negatives` candidates (3 hard-ish ones from
    the data, the rest random from the pool); refuses a pool too small for the count."""
    if not os.path.exists(os.path.join(root, "meta", "summary.json")):
        generate_data(root, seed=0)
    qs = mbeir.read_queries(os.path.join(root, "query/train/mbeir_multigrain_union_train.jsonl"))
    pool = mbeir.read_pool(os.path.join(root, "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"))
    hard = min(3, negatives)
    recs = contrastive_records(qs, pool, root, num_negatives=hard)
    sides = [
        {
            "text": c.txt,
            "image": str(mbeir.resolve_image_path(root, c.img_path)) if c.img_path else None,
            "instruction": None,
        }
        for c in pool.values()
    ]
    if negatives > hard:
        recs = add_random_negatives(recs, sides, negatives - hard, seed=0)
    recs = recs[:steps]
    short = [len(r["cands"]) for r in recs if len(r["cands"]) != 1 + negatives]
    if short or len(recs) < steps:
        raise ValueError(f"the bundled pool ({len(sides)} sides) gives {short or len(recs)} candidates / records")
    return recs


def _configs(a):
    rcfg = RLConfig(
        group_size=a.group_size,
        max_summary_tokens=a.summary_tokens,
        micro_instances=a.micro_instances,
        old_logp=a.old_logp,
        ret_embedding=a.ret_embedding,
        cache_dtype=a.cache_dtype,
    )
    return rcfg, RewardConfig(), LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA)


def _summary(rows: list[dict]) -> dict:
    steady = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in steady) for k in KEYS}
    total = sum(med.values())
    toks = statistics.median(r["tokens_sampled"] for r in steady)
    return {
        "first_step_s": round(sum(rows[0][k] for k in KEYS), 2),
        "step_s": round(total, 3),
        **{k: round(v, 3) for k, v in med.items()},
        "share": {k.replace("time_", "").replace("_s", ""): round(v / total, 3) for k, v in med.items()},
        "rollout_tokens_per_s": round(toks / med["time_rollout_s"], 1),
        "reward": round(statistics.median(r["reward"] for r in steady), 4),
        "summary_len": statistics.median(r["summary_len"] for r in steady),
    }


def _tokenizer_and_cfg():
    tok = Tokenizer.from_dir()
    cfg = preset_config("small")
    return tok, cfg, max(cfg.text.vocab_size, tok.vocab_size)


def jax_side(a, recs) -> dict:
    rcfg, reward_cfg, lcfg = _configs(a)
    tok, cfg, vocab = _tokenizer_and_cfg()
    params = init_params(cfg, jax.random.key(0))
    params, cfg = resize_vocab(params, cfg, vocab)
    tx = optax.adamw(LR)

    def trainer(rc):
        tr = RLTrainer.from_tokenizer(
            cfg,
            ModelOptions(remat=a.remat),
            rc,
            reward_cfg,
            tx,
            tok,
            lora_scale=lcfg.scale,
            prompt_buckets=(256, 384),
            media=MediaSettings(patch_row_len=64),
        )
        lora = init_lora(cfg, lcfg, jax.random.key(1))
        return tr, RLState(0, params, lora, tx.init(lora), jax.random.key(2))

    tr, st = trainer(rcfg)
    if a.memory_plan:
        return {"device": jax.devices()[0].device_kind, "memory_plan": memory_plan(tr, st, recs[0])}
    if a.compare_passes:  # the teacher-forced passes (recompute) and the default one, alternating (the same load)
        old = dataclasses.replace(rcfg, old_logp="recompute", ret_embedding="recompute", cache_dtype="bfloat16")
        new = dataclasses.replace(rcfg, old_logp="auto", ret_embedding="sampler", cache_dtype="compute")
        sides = {"recompute": trainer(old), "default": trainer(new)}
        rows = {k: [] for k in sides}
        for r in recs:
            for k, (tr_k, st_k) in sides.items():
                st_k, m = tr_k.step(st_k, [r])
                sides[k] = (tr_k, st_k)
                rows[k].append(m)
        out = {k: _summary(v) for k, v in rows.items()}
        o, n = out["recompute"], out["default"]
        out["saved"] = {k: round(o[k] - n[k], 3) for k in ("step_s", *KEYS)}
        out["speedup"] = round(o["step_s"] / n["step_s"], 3)
        return {"device": jax.devices()[0].device_kind, **out}
    rows = []
    for r in recs:
        st, m = tr.step(st, [r])
        rows.append(m)
    return {"device": jax.devices()[0].device_kind, **_summary(rows)}


def memory_plan(tr, st, rec) -> dict:
    """XLA's memory analysis (MiB) of the three compiled pieces of one step on ``rec``'s shapes, compiled
    and not run: the sampler, the teacher-forced re-forward and the update (fake samples, full budget)."""
    G, T = tr.rcfg.group_size, tr.rcfg.max_summary_tokens + 1
    N = (2 + len(rec["cands"]) - 1) * G
    fake = Samples(
        np.zeros((N, T), np.int32),
        np.zeros((N, T), np.float32),
        np.ones((N, T), bool),
        np.full(N, T, np.int32),
        np.ones(N, bool),
    )
    _, prompts, shape, chunks = tr.rollouts(st, [rec], fake)
    tok, ln = jnp.asarray(fake.tokens), jnp.asarray(fake.lengths)
    z = jnp.zeros((N, T), jnp.float32)
    batch = {"prompts": prompts, "gen_tokens": tok, "gen_lengths": ln, "mask": jnp.asarray(fake.mask)}
    batch.update(old_logp=z, ref_logp=z, adv=jnp.zeros(N), valid=jnp.ones((1, len(rec["cands"])), bool))
    pieces = {
        "sampler": tr._gen.lower(st.params, st.lora, chunks[0], st.key, G),
        "reforward": tr._tf.lower(st.params, st.lora, chunks[0], tok, ln, G),
        "update": tr._update_for(st).lower(st.lora, st.opt_state, st.params, batch, shape),
    }
    out = {}
    for k, low in pieces.items():
        m = low.compile().memory_analysis()
        out[k] = {
            f: round(getattr(m, f"{f}_size_in_bytes") / 2**20, 1) for f in ("argument", "output", "temp", "alias")
        }
    return out


def torch_side(a, recs) -> dict:
    # local: the PyTorch reference's heavy optional dependencies (rl_step_torch imports torch), needed by
    # --side torch|both only
    import torch
    import transformers

    from elva_jax.bench.rl_step_torch import TorchRLStep, hf_config, lora_model

    rcfg, reward_cfg, lcfg = _configs(a)
    tok, cfg, vocab = _tokenizer_and_cfg()
    cfg = cfg.with_vocab_size(vocab)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(hf_config(cfg))
    pm = lora_model(model, rank=lcfg.rank, alpha=lcfg.alpha, targets=lcfg.targets)
    # optax.adamw's defaults (b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-4), as on the elva_jax side
    ref = TorchRLStep(
        pm,
        rcfg,
        reward_cfg,
        lr=LR,
        weight_decay=1e-4,
        ret_id=tok.ret_token_id,
        eos_id=tok.im_end_token_id,
        pad_id=tok.pad_token_id,
        row_chunk=a.row_chunk,
    )
    enc = PromptEncoder(tok, "ret", generation=True)
    rows = []
    for r in recs:
        sides = [r["query"], *r["cands"]]
        ids, am, pvs, grids = encode_prompts(
            sides,
            enc,
            min_pixels=MediaSettings.min_pixels,  # the RLTrainer's default limits, as on the elva_jax side
            max_pixels=MediaSettings.max_pixels,
            buckets=(256, 384),
            pad_id=tok.pad_token_id,
            geometry=cfg.vision.geometry,
        )
        rows.append(ref.step(ids, am, pvs, grids, 1))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), **_summary(rows)}


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.bench.rl_step", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=3, help="timed steps per side after one warm-up step (0: time that one)"
    )
    ap.add_argument("--torch-steps", type=int, default=None, help="timed steps of the reference (default --steps)")
    ap.add_argument("--side", default="both", choices=["both", "jax", "torch"])
    ap.add_argument("--negatives", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--summary-tokens", type=int, default=16)
    ap.add_argument("--micro-instances", type=int, default=0, help="rl.micro_instances of the elva_jax side")
    ap.add_argument("--row-chunk", type=int, default=72, help="rows per teacher-forced pass of the reference")
    ap.add_argument("--data", default="")
    # the step's passes (rl.old_logp / rl.ret_embedding / rl.cache_dtype; elva_jax side): "recompute" for
    # both and a bfloat16 cache is the step without the fast paths
    ap.add_argument("--old-logp", default="auto", choices=["auto", "recompute"])
    ap.add_argument("--ret-embedding", default="sampler", choices=["sampler", "recompute"])
    ap.add_argument("--cache-dtype", default="compute", choices=["compute", "float32", "bfloat16"])
    ap.add_argument(
        "--compare-passes",
        action="store_true",
        help="elva_jax: the recomputing step (both passes, bf16 cache) vs the default, alternating steps",
    )
    ap.add_argument("--remat", action="store_true", help="elva_jax: rematerialise each layer in the backward")
    ap.add_argument("--memory-plan", action="store_true", help="elva_jax: compile only, print XLA's memory analysis")
    a = ap.parse_args(argv)
    root = a.data or os.path.join(tempfile.mkdtemp(), "mg")
    t_steps = a.steps if a.torch_steps is None else a.torch_steps
    recs = bench_instances(root, a.negatives, max(a.steps, t_steps) + 1)
    G, S = a.group_size, 2 + a.negatives
    res = {
        "workload": "W4",
        "G": G,
        "candidates": 1 + a.negatives,
        "summary_tokens": a.summary_tokens,
        "sequences_per_step": G * S,
        "lora": f"rank {LORA_RANK} alpha {LORA_ALPHA:g}, decoder linears",
        "passes": {"old_logp": a.old_logp, "ret_embedding": a.ret_embedding, "cache_dtype": a.cache_dtype},
    }
    if a.memory_plan or a.compare_passes:
        a.side = "jax"
    if a.side in ("both", "torch"):
        res["torch"] = torch_side(a, recs[: t_steps + 1])
    if a.side in ("both", "jax"):
        res["elva_jax"] = jax_side(a, recs[: a.steps + 1])
    if a.side == "both" and not a.memory_plan:
        j, t = res["elva_jax"], res["torch"]
        res["speedup_vs_torch"] = round(t["step_s"] / j["step_s"], 2)
        res["phase_speedup"] = {k: round(t[k] / max(j[k], 1e-9), 2) for k in KEYS}
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
