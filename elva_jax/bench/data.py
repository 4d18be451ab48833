"""Input-pipeline throughput on the bundled multi-grain data (examples/s, images/s); one JSON line.

    python -m elva_jax.bench.data [--n-batches 20 --batch 16 --workers 2 --negatives 1]
                                  [--sources files,array_record,hf]

Measures the contrastive pipeline (tokenize, image decode + preprocess, pack, positions) single
process and, when ``--workers > 0``, with grain ``mp_prefetch``, for each record source
(``elva_jax.data.sources``: the jsonl + image files, and the same data prepared as ArrayRecord shards
and as an HF datasets directory with the images' bytes inside). The first batch (warm-up, worker
start) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence

from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.pipeline.config import PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline
from elva_jax.data.prepare import prepare
from elva_jax.data.records import ContrastiveRecords
from elva_jax.data.sources import SOURCES, open_source
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model.tiny import preset_config


def _measure(records, encoder, model_cfg, cfg, n_batches: int) -> dict:
    it = make_pipeline(records, encoder, model_cfg, cfg)
    next(it)
    ex0, im0 = it.stats.examples, it.stats.images
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t
    return {
        "examples_per_s": round((it.stats.examples - ex0) / dt, 1),
        "images_per_s": round((it.stats.images - im0) / dt, 1),
        "seconds": round(dt, 3),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="mp_prefetch workers (0: single process only)")
    ap.add_argument("--sources", default="files,array_record,hf", help="comma-separated data.source values")
    args = ap.parse_args(argv)

    sources = [x for x in args.sources.split(",") if x]
    unknown = [x for x in sources if x not in SOURCES]
    if unknown:
        ap.error(f"--sources: unknown {unknown} (choose from {list(SOURCES)})")
    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/files"
        generate(root, seed=0)
        roots = {"files": root}
        for fmt in sources:
            if fmt != "files":
                roots[fmt] = f"{tmp}/{fmt}"
                prepare(root, roots[fmt], fmt=fmt, log=lambda _: None)
        b = args.batch
        encoder, model_cfg = PromptEncoder(Tokenizer.from_dir(), "eol"), preset_config("tiny")
        cfg = PipelineConfig(
            batch_size=b,
            num_negatives=args.negatives,
            patch_budget=(max(1, b // 3), 256),
            cand_patch_budget=(max(1, b * (1 + args.negatives) // 3), 256),
            num_epochs=None,
            process_index=0,
            process_count=1,
            pad_token_id=encoder.tokenizer.pad_token_id,
        )
        result = {"bench": "data_pipeline", "batch": b, "negatives": args.negatives, "n_batches": args.n_batches}
        if args.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
        for name in sources:
            src = open_source(roots[name], name)
            records = ContrastiveRecords(
                src.queries("query/train/mbeir_multigrain_union_train.jsonl"),
                src.pool("cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"),
                src.image_root,
                instructions=src.instructions("instructions/query_instructions.tsv"),
                num_negatives=args.negatives,
            )
            out = {"single_process": _measure(records, encoder, model_cfg, cfg, args.n_batches)}
            if args.workers > 0:
                try:
                    mp_cfg = dataclasses.replace(cfg, mp_workers=args.workers)
                    out[f"mp_prefetch_{args.workers}"] = _measure(records, encoder, model_cfg, mp_cfg, args.n_batches)
                except Exception as e:  # report, do not hide
                    out[f"mp_prefetch_{args.workers}"] = {"error": f"{type(e).__name__}: {e}"}
            result[name] = out
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
