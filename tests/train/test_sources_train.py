"""The same contrastive training run (the real entry point, a tiny random model, the bundled data) from
local files, from an HF datasets directory and from prepared ArrayRecord shards: identical losses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.prepare import prepare
from elva_jax.train.stages import main

Q = "query/train/mbeir_multigrain_union_train.jsonl"
POOL = "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"


@pytest.mark.slow
def test_the_loss_curve_is_the_same_from_every_source(tmp_path):
    mg = tmp_path / "mg"
    generate(mg, seed=0)
    roots = {"files": str(mg)}
    for fmt in ("array_record", "hf"):
        roots[fmt] = str(tmp_path / fmt)
        prepare(str(mg), roots[fmt], fmt=fmt, rows_per_shard=64, log=lambda _: None)
    losses = {}
    for source, root in roots.items():
        run_dir = tmp_path / f"run_{source}"
        main(
            [
                f"run.dir={run_dir}",
                "train.stages=[contrastive]",
                "train.eval_modes=[]",
                "train.max_steps=3",
                "train.global_batch=4",
                "run.checkpoint_every=100",
                "data.kind=mbeir",
                f"data.root={root}",
                f"data.source={source}",
                f"data.train_files=[{Q}]",
                f"data.pool_file={POOL}",
                "data.seq_buckets=[128]",
                "data.patch_row_len=128",
            ]
        )
        s = json.load(open(run_dir / "summary.json"))
        assert s["records"] == 160 and s["pipeline"]["images"] > 0 and s["pipeline"]["skipped"] == 0
        losses[source] = s["losses"]
    assert len(losses["files"]) == 3 and np.isfinite(losses["files"]).all()
    assert losses["array_record"] == losses["files"]
    assert losses["hf"] == losses["files"]
