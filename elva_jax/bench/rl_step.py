"""W4: one ELVA RL step on the "small" model, time split by phase (rollout / re-forward / reward / update).

    python -m elva_jax.bench.rl_step [--steps 3] [--data DIR]

Workload (benchmarks.md): G = 8 rollouts, 1 positive + 8 negatives, 16-token summaries (no early stop
is forced: random weights rarely emit [RET], so summaries run to the budget), one instance per step
from the bundled multi-grain data (text and image sides). Reports the median of the steps after the
first (which compiles), and the rollout's sampled tokens/s for comparison with W2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import jax
import optax


def main(argv=None) -> None:
    from elva_jax.data import mbeir
    from elva_jax.data.multigrain import generate as generate_data
    from elva_jax.data.pipeline import contrastive_records
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.hf_checkpoint import resize_vocab
    from elva_jax.model.lora import LoraConfig, init_lora
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config
    from elva_jax.rl.loop import add_random_negatives
    from elva_jax.rl.rewards import RewardConfig
    from elva_jax.rl.rollout import RLConfig
    from elva_jax.rl.trainer import RLState, RLTrainer

    ap = argparse.ArgumentParser(prog="python -m elva_jax.bench.rl_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", default="")
    a = ap.parse_args(argv)
    root = a.data or os.path.join(tempfile.mkdtemp(), "mg")
    if not os.path.exists(os.path.join(root, "meta", "summary.json")):
        generate_data(root, seed=0)
    qs = mbeir.read_queries(os.path.join(root, "query/train/mbeir_multigrain_union_train.jsonl"))
    pool = mbeir.read_pool(os.path.join(root, "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"))
    recs = contrastive_records(qs, pool, root, num_negatives=3)
    sides = [
        {
            "text": c.txt,
            "image": str(mbeir.resolve_image_path(root, c.img_path)) if c.img_path else None,
            "instruction": None,
        }
        for c in pool.values()
    ]
    recs = add_random_negatives(recs, sides, 5, seed=0)  # 1 + 8 candidates
    tok = Tokenizer.from_dir()
    cfg = preset_config("small")
    params = init_params(cfg, jax.random.key(0))
    params, cfg = resize_vocab(params, cfg, max(cfg.text.vocab_size, tok.vocab_size))
    lcfg = LoraConfig(rank=16, alpha=32)
    lora = init_lora(cfg, lcfg, jax.random.key(1))
    tx = optax.adamw(1e-5)
    rcfg = RLConfig(group_size=8, max_summary_tokens=16)
    tr = RLTrainer.from_tokenizer(
        cfg,
        ModelOptions(),
        rcfg,
        RewardConfig(),
        tx,
        tok,
        lora_scale=lcfg.scale,
        prompt_buckets=(256, 384),
        patch_row_len=64,
    )
    st = RLState(0, params, lora, tx.init(lora), jax.random.key(2))
    rows = []
    for i in range(a.steps + 1):
        st, m = tr.step(st, [recs[i]])
        rows.append(m)
    keys = ("time_rollout_s", "time_reforward_s", "time_reward_s", "time_update_s")
    steady = rows[1:]
    med = {k: statistics.median(r[k] for r in steady) for k in keys}
    total = sum(med.values())
    toks = statistics.median(r["tokens_sampled"] for r in steady)
    res = {
        "workload": "W4",
        "device": jax.devices()[0].device_kind,
        "G": 8,
        "candidates": 9,
        "summary_tokens": 16,
        "sequences_per_step": 8 * 10,
        "first_step_s": round(sum(rows[0][k] for k in keys), 2),
        "step_s": round(total, 3),
        **{k: round(v, 3) for k, v in med.items()},
        "share": {k.replace("time_", "").replace("_s", ""): round(v / total, 3) for k, v in med.items()},
        "rollout_tokens_per_s": round(toks / med["time_rollout_s"], 1),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
