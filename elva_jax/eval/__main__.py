"""``python -m elva_jax.eval``: M-BEIR, MRBench, MMEB-V2, zero-shot and grain-sensitivity evaluation.

    python -m elva_jax.eval --checkpoint runs/default                       # bundled set, mode auto, local pools
    python -m elva_jax.eval --checkpoint DIR --config configs/qwen2vl_7b_mbeir.yaml --benchmark mbeir \\
        --mode ret --pool global data.root=/data/M-BEIR eval.batch_size=32
    python -m elva_jax.eval --checkpoint DIR --mode instruct_last                # Qwen3-VL-Embedding convention
    python -m elva_jax.eval --checkpoint DIR --benchmark mrbench eval.mrbench_dir=/data/MRBench data.root=/data/M-BEIR
    python -m elva_jax.eval --checkpoint DIR --benchmark zeroshot --task mytask:q.jsonl:pool.jsonl:qrels.txt:10
    python -m elva_jax.eval --checkpoint DIR --benchmark mmeb --data /data/MMEB    # no --data: bundled MMEB set
    python -m elva_jax.eval --checkpoint DIR --grain-masking --compare-to runs/base/eval/bundled-eol-local/results.json
    python -m elva_jax.eval --checkpoint EMBEDDER --benchmark mmeb --cot reasoner=runs/embed_rl --cot-crops
    python -m elva_jax.eval --checkpoint EMBEDDER --benchmark mbeir --cot reasoner=DIR,max_tokens=128 data.root=...

Writes results.json, results.md and recall.png to --out (default {run}/eval/{benchmark}-{mode}-{pool}); each
states the embedding mode and why it was chosen (--mode, or auto: the checkpoint's export record).
Any ``eval.*`` field (elva_jax.schema.EvalSection) or preset key can be overridden as key=value.
"""

from __future__ import annotations

import argparse

from elva_jax import configlib
from elva_jax.errors import cli

COT_KEYS = ("reasoner", "max_tokens", "sampling", "temperature", "top_p", "seed", "batch_size", "max_crops")


def cot_overrides(spec: str) -> list[str]:
    """``reasoner=DIR[,key=value...]`` (or a bare DIR) -> ``eval.cot_<key>=value`` overrides."""
    out = []
    for i, part in enumerate(p for p in spec.split(",") if p):
        key, eq, value = part.partition("=")
        if not eq and i == 0:
            key, value = "reasoner", part
        elif not eq or key not in COT_KEYS:
            raise SystemExit(f"--cot {spec!r}: {part!r} is not one of {', '.join(k + '=...' for k in COT_KEYS)}")
        out.append(f"eval.cot_{key}={value}")
    if not any(o.startswith("eval.cot_reasoner=") for o in out):
        raise SystemExit(f"--cot {spec!r}: needs reasoner=DIR")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="transformers checkpoint dir, or a training run dir (uses its export/)")
    ap.add_argument("--config", help="YAML preset (configs/*.yaml); default: configs/tiny_cpu.yaml")
    ap.add_argument("--benchmark", choices=("bundled", "mbeir", "mrbench", "zeroshot", "mmeb"))
    ap.add_argument("--data", help="data root (eval.data_root): M-BEIR root, MMEB directory, ...")
    ap.add_argument(
        "--mode",
        choices=("auto", "eol", "ret", "instruct_last"),  # elva_jax.schema.EMBED_MODES (not imported: light --help)
        help="eol: LamRA embedding; ret: ELVA summary + [RET] (the paper's evaluation); instruct_last: "
        "Qwen3-VL-Embedding (instruction as the system turn, last token; candidates get data.default_instruction); "
        "auto (default): what the checkpoint's export record says it was trained for (ret after the RL stage), "
        "else eol",
    )
    ap.add_argument("--pool", choices=("local", "global"))
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--compare-to", help="a previous results.json (before/after table and bars)")
    ap.add_argument("--grain-masking", action="store_true", help="also run the grain-masking analysis")
    ap.add_argument("--cache", choices=("use", "repair", "none"), help="embedding cache policy (default use)")
    ap.add_argument(
        "--tie-order",
        choices=("index", "faiss"),
        help="exactly tied scores: index (lower candidate index first, default) or faiss (as UniIR's "
        "faiss IndexFlatIP on CPU: its kept ties, higher index first)",
    )
    ap.add_argument("--task", action="append", default=[], help="zero-shot task name:query:pool:qrels[:K]")
    ap.add_argument(
        "--cot",
        metavar="reasoner=DIR[,key=value...]",
        help="Embed-RL evidence grounding: the reasoner DIR (transformers dir or Embed-RL run dir) writes a T-CoT for "
        "every query and candidate (cached), which the --checkpoint model embeds with the side; keys "
        f"{', '.join(COT_KEYS)} set eval.cot_<key> (e.g. max_tokens=128,sampling=sample,temperature=0.7)",
    )
    ap.add_argument(
        "--cot-crops",
        action="store_true",
        help="with --cot: each parsed bbox_2d (image sides) / key frame (video sides) becomes an extra image",
    )
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.batch_size=16")
    a = ap.parse_args(argv)
    over = []
    for flag, key in (
        ("benchmark", "eval.benchmark"),
        ("mode", "eval.mode"),
        ("pool", "eval.pool"),
        ("out", "eval.out"),
        ("data", "eval.data_root"),
        ("compare_to", "eval.compare_to"),
        ("cache", "eval.cache"),
        ("tie_order", "eval.tie_order"),
    ):
        v = getattr(a, flag)
        if v:
            over.append(f"{key}={v}")
    if a.grain_masking:
        over.append("eval.grain_masking=true")
    if a.cot:
        over += cot_overrides(a.cot)
    if a.cot_crops:
        if not a.cot:
            raise SystemExit("--cot-crops needs --cot reasoner=DIR")
        over.append("eval.cot_crops=true")
    if a.task:
        over.append("eval.zeroshot_tasks=[" + ", ".join(f"'{t}'" for t in a.task) + "]")
        if not a.benchmark:
            over.append("eval.benchmark=zeroshot")
    over += a.overrides

    # imported here, not at the top, so that --help and argument errors answer without loading JAX
    from elva_jax.data.benchmarks.mmeb.tasks import MMEBDataError
    from elva_jax.data.errors import DataFormatError
    from elva_jax.eval.embed_cache import CacheError
    from elva_jax.eval.runner import evaluate, load_config
    from elva_jax.eval.tasks import EvalDataError
    from elva_jax.model.hf_checkpoint import CheckpointError

    try:
        cfg = load_config(a.config, over)
        return evaluate(cfg, checkpoint=a.checkpoint)
    except configlib.ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except (DataFormatError, EvalDataError, MMEBDataError, CacheError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.eval")
