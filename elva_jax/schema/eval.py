"""The evaluation section of the run schema."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from elva_jax.data.conventions import EVALUATED

CACHE_POLICIES = ("use", "repair", "none")
#: embedding conventions of evaluation (and train.eval_modes): LamRA EOL, ELVA [RET], Qwen3-VL-Embedding
EMBED_MODES = EVALUATED


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """What ``python -m elva_jax.eval`` evaluates and how (every field is an ``eval.*`` override)."""

    benchmark: str = field(default="bundled", metadata={"choices": ("bundled", "mbeir", "mrbench", "zeroshot", "mmeb")})
    # "eol" LamRA, "ret" ELVA summary + [RET], "instruct_last" Qwen3-VL-Embedding (data.default_instruction);
    # "auto": the embedding the checkpoint was trained for, from its export record (elva_export.json):
    # "ret" after the RL stage (the paper's evaluation), the contrastive stage's train.embedding otherwise
    # ("last" -> "eol"); "eol" for a checkpoint without a record
    mode: str = field(default="auto", metadata={"choices": ("auto", *EMBED_MODES)})
    pool: str = field(default="local", metadata={"choices": ("local", "global")})
    out: str = ""  # "" -> {run dir}/eval/{benchmark}-{mode}-{pool}
    data_root: str = ""  # "" -> data.root (bundled / mmeb: the run's bundled set, generated if absent)
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
    # order among exactly tied scores: "index" (lower candidate index first, elva_jax's rule) or "faiss"
    # (which ties faiss's CPU IndexFlatIP keeps and in what order: UniIR's numbers; topk <= 99)
    tie_order: str = field(default="index", metadata={"choices": ("index", "faiss")})
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
    # Embed-RL evidence grounding (`elva_jax.eval.cot`, ``--cot reasoner=DIR``): "" = off; else the reasoner
    # (a transformers dir or an Embed-RL run dir: its export/) writes a T-CoT for every query and candidate
    # (embed_rl.reasoner_instruction; cached on disk), and each side is embedded with its CoT in the frozen
    # embedder's layout (embed_rl.summarise_instruction, hidden state at <emb>) by the --checkpoint model
    cot_reasoner: str = ""
    cot_crops: bool = False  # parsed bbox_2d (image sides) / key_frames (video sides) become extra images
    cot_max_crops: int = 4  # at most this many extra images per side (the first boxes / key frames)
    cot_max_tokens: int = 256  # CoT budget: new tokens before a forced <|im_end|>
    cot_sampling: str = field(default="greedy", metadata={"choices": ("greedy", "sample")})
    cot_temperature: float = 1.0  # cot_sampling=sample only (as cot_top_p, cot_seed)
    cot_top_p: float = 1.0
    cot_seed: int = 0
    cot_batch_size: int = 0  # sides per generation batch; 0 = eval.batch_size
