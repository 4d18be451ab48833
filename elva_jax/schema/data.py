"""The data section of the run schema: what is read, how it is batched, media limits."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from elva_jax.configlib import FINGERPRINT_ALL
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.prompts import DEFAULT_EMBED_INSTRUCTION
from elva_jax.data.sources import SOURCES


@dataclasses.dataclass(frozen=True)
class DataSection(MediaSettings):
    """The ``data.*`` keys: the media settings (`MediaSettings`: ``patch_row_len``, ``min_pixels`` /
    ``max_pixels``, ``video_*``, declared and documented there) and the fields below."""

    kind: str = field(
        default="mbeir", metadata={"choices": ("mbeir", "nli", "bundled"), "fingerprint": FINGERPRINT_ALL}
    )
    # M-BEIR root, NLI csv, or "" for the bundled multi-grain set (generated on demand)
    root: str = field(default="", metadata={"fingerprint": FINGERPRINT_ALL})
    # kind bundled: base scenes per split of the generated set (elva_jax.data.benchmarks.multigrain; queries per task)
    bundled_train_scenes: int = 32
    bundled_test_scenes: int = 16
    # how `root` is read (elva_jax.data.sources): "files" (jsonl/csv + image files), "hf" / "array_record"
    # (a directory written by `python -m elva_jax.data.prepare --format ...`, images inside); local or gs://
    source: str = field(default="files", metadata={"choices": SOURCES})
    # query jsonl files relative to root (M-BEIR)
    train_files: tuple[str, ...] = field(default=(), metadata={"fingerprint": FINGERPRINT_ALL})
    # candidate pool jsonl relative to root (M-BEIR)
    pool_file: str = field(default="", metadata={"fingerprint": ("contrastive", "sft", "embed_rl_sft")})
    instructions_file: str = "instructions/query_instructions.tsv"
    hard_negatives: int = field(default=0, metadata={"fingerprint": ("contrastive",)})  # LamRA: 0
    seq_buckets: tuple[int, ...] = (64, 128, 256)
    max_text_tokens: int = 256
    patch_rows: int = 0  # 0: one row per example; else rows of `patch_row_len` patches per batch
    image_policy: str = field(default="fail", metadata={"choices": ("fail", "skip")})
    max_skip_fraction: float = 0.01
    instruction_seed: int = 0
    shuffle_seed: int = field(default=0, metadata={"fingerprint": ("contrastive",)})
    # "instruct_last" prompts (train.embedding, eval.mode, rl.mining_embedding): the system instruction of
    # every record without its own (candidates; queries when instructions are off). Qwen3-VL-Embedding's default
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION
