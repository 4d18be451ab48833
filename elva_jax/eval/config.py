"""The `eval` section of a run config (light: no jax import, so the training config can hold it)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

CACHE_POLICIES = ("use", "repair", "none")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """What ``python -m elva_jax.eval`` evaluates and how (every field is an ``eval.*`` override)."""

    benchmark: str = field(default="bundled", metadata={"choices": ("bundled", "mbeir", "mrbench", "zeroshot")})
    mode: str = field(default="eol", metadata={"choices": ("eol", "ret")})
    pool: str = field(default="local", metadata={"choices": ("local", "global")})
    out: str = ""  # "" -> {run dir}/eval/{benchmark}-{mode}-{pool}
    data_root: str = ""  # "" -> data.root (bundled: the run's bundled_data, generated if absent)
    image_root: str = ""  # MRBench: the M-BEIR root its image paths are relative to ("" = data root)
    mrbench_dir: str = ""  # "" -> {data root}/mrbench
    zeroshot_tasks: tuple[str, ...] = ()  # "name:query.jsonl:pool.jsonl:qrels.txt[:K]" (relative to data root)
    tasks: tuple[str, ...] = ()  # evaluate only these task names; () = all of the benchmark
    max_queries: int = 0  # > 0: first N queries per task (quick checks; recorded)
    batch_size: int = 8
    part_size: int = 1024  # records per embedding cache part
    cache: str = field(default="use", metadata={"choices": CACHE_POLICIES})
    cache_dir: str = ""  # "" -> {out}/cache
    topk: int = 50
    recall_ks: tuple[int, ...] = (1, 5, 10, 50)
    chunk_size: int = 65536  # candidates per streaming top-k step
    instructions: bool = True
    instruction_seed: int | None = None  # None: crc32(qid) rule
    instruction_index: int | None = None  # fixed prompt index (overrides the seed)
    summary_tokens: int = 32  # "ret": max generated summary tokens before a forced [RET]
    sampling: str = field(default="greedy", metadata={"choices": ("greedy", "sample")})
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    grain_masking: bool = False
    grains_file: str = ""  # "" -> {bundled root}/meta/query_grains.jsonl; else a jsonl of {qid, phrases}
    grain_max_queries: int = 100
    compare_to: str = ""  # a previous results.json: before/after columns and bars
