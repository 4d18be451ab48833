"""The run configuration schema, the single source of every setting of every stage (each field named,
typed and documented; YAML presets in configs/). Stages read their section; pure functions that take
a smaller config (`RewardConfig`, `SamplerConfig`, ...) get it from a section with `project`.

Values the paper or LamRA fix are defaults or preset values; values they leave open are named
fields with a stated default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from elva_jax.configlib import ConfigError
from elva_jax.data.prompts import (
    DEFAULT_EMBED_INSTRUCTION,
    TCOT_JUDGE_INSTRUCTION,
    TCOT_REASONER_INSTRUCTION,
    TCOT_SUMMARISE_INSTRUCTION,
)
from elva_jax.data.sources import SOURCES
from elva_jax.model.decoder import LORA_TARGETS

CACHE_POLICIES = ("use", "repair", "none")
#: embedding conventions of evaluation (and train.eval_modes): LamRA EOL, ELVA [RET], Qwen3-VL-Embedding
EMBED_MODES = ("eol", "ret", "instruct_last")


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


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None  # None: no clipping (LamRA)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint: str = ""  # transformers directory of a supported family; "" = a random model of `random_preset`
    # random model presets (elva_jax.model.tiny): "tiny" (Qwen2-VL), "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small"
    random_preset: str = field(
        default="tiny", metadata={"choices": ("tiny", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small")}
    )
    tokenizer: str = ""  # directory with tokenizer files; "" = the checkpoint's, else the bundled Qwen2 files
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})  # compute
    param_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})  # master weights
    position_mode: str = field(default="mrope", metadata={"choices": ("mrope", "1d")})
    remat: bool = False
    # the generation vocabulary (summaries, the SFT targets' log-probs, RL rollouts, eval's [RET] summaries):
    # () = every token; else only these words (each with and without a leading space), "," and " ", [RET]
    # and <|im_end|> can be generated (`elva_jax.data.tokenize.generation_vocab`). A sampler option for
    # models whose LM head is not trained to write (tiny random ones); real checkpoints leave it empty
    generation_words: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoraSection:
    enabled: bool = True  # False: full fine-tuning of the LLM (vision tower and merger stay frozen)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    # dropout on the LoRA branches' input in the contrastive stages' training forwards (PEFT's lora_dropout;
    # LamRA 0.05, set in the stage-1/2 presets). 0 here keeps the tiny presets deterministic. Never at eval or
    # export; not in the RL stage (it would change the log-probs GRPO's ratio and KL compare)
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataSection:
    kind: str = field(default="mbeir", metadata={"choices": ("mbeir", "nli", "bundled")})
    root: str = ""  # M-BEIR root, NLI csv, or "" for the bundled multi-grain set (generated on demand)
    # kind bundled: base scenes per split of the generated set (elva_jax.data.multigrain; queries per task)
    bundled_train_scenes: int = 32
    bundled_test_scenes: int = 16
    # how `root` is read (elva_jax.data.sources): "files" (jsonl/csv + image files), "hf" / "array_record"
    # (a directory written by `python -m elva_jax.data.prepare --format ...`, images inside); local or gs://
    source: str = field(default="files", metadata={"choices": SOURCES})
    train_files: tuple[str, ...] = ()  # query jsonl files relative to root (M-BEIR)
    pool_file: str = ""  # candidate pool jsonl relative to root (M-BEIR)
    instructions_file: str = "instructions/query_instructions.tsv"
    hard_negatives: int = 0  # LamRA: 0
    seq_buckets: tuple[int, ...] = (64, 128, 256)
    max_text_tokens: int = 256
    patch_rows: int = 0  # 0: one row per example; else rows of `patch_row_len` patches per batch
    patch_row_len: int = 1200  # LamRA max 300 visual tokens = 1200 patches
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 300 * 28 * 28
    # video sides (elva_jax.data.video.load_video): frames sampled per second (0: every frame), frame-count
    # bounds, pixel limits per frame (Qwen2-VL / Qwen2.5-VL) or over all frames (Qwen3-VL; 0: the family's
    # video-processor default). Not from a paper: chosen so a clip fits a 1200-patch row (8 frames of
    # <= 64*28*28 px = 4 temporal patches of <= 256 patches); a longer video is resampled to fit the row
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_pixels: int = 4 * 28 * 28
    video_max_pixels: int = 64 * 28 * 28
    image_policy: str = field(default="fail", metadata={"choices": ("fail", "skip")})
    max_skip_fraction: float = 0.01
    instruction_seed: int = 0
    shuffle_seed: int = 0
    # "instruct_last" prompts (train.embedding, eval.mode, rl.mining_embedding): the system instruction of
    # every record without its own (candidates; queries when instructions are off). Qwen3-VL-Embedding's default
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION


@dataclasses.dataclass(frozen=True)
class RLSection:
    """Stage 3 (ELVA). Paper values: G 8, beta 0.2, LR 1e-6 (set in optim), 50 hard + 50 random negatives,
    alpha 0.4, epsilon 0.6. Everything else is not stated in the paper: named defaults."""

    group_size: int = 8
    instances_per_step: int = 1
    # instances per gradient micro-batch of the update (0: all instances_per_step at once); the
    # gradient is exactly the one-pass gradient, with one micro-batch's activations in memory
    micro_instances: int = 0
    query_fraction: float = 0.01  # share of each training set used as RL instances (paper: ~1 %)
    negatives: str = field(default="mined", metadata={"choices": ("mined", "dataset")})
    # "mined": the embedding the queries and pool are mined with (LamRA EOL, or Qwen3-VL-Embedding's)
    mining_embedding: str = field(default="eol", metadata={"choices": ("eol", "instruct_last")})
    num_hard_negatives: int = 50
    num_random_negatives: int = 50
    # likely false negatives left out of the mined hard negatives: "absolute" drops scores above
    # false_negative_threshold (cosine, the mining embedding); "relative" drops scores above
    # s_pos - false_negative_margin (s_pos: the query's best positive; UniME / Qwen3-VL-Embedding-style)
    false_negative_filter: str = field(default="absolute", metadata={"choices": ("absolute", "relative")})
    false_negative_threshold: float = 0.95
    false_negative_margin: float = 0.1
    beta: float = 0.2
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_estimator: str = field(default="k3", metadata={"choices": ("k1", "k2", "k3")})
    # weight the KL term by the importance ratio (TRL's use_bias_correction_kl, True by default in TRL 1.16;
    # False here: DeepSeekMath's GRPO, which the paper cites, has the plain KL term)
    kl_bias_correction: bool = False
    loss_type: str = field(default="grpo", metadata={"choices": ("grpo", "bnpo", "dapo", "dr_grpo")})  # TRL's names
    # advantage normalisation: std over each group (TRL's default), over the whole batch, or none
    adv_scale: str = field(default="group", metadata={"choices": ("group", "batch", "none")})
    adv_ddof: int = 0  # 0: population std over the G rewards; TRL's torch std is ddof 1 (Bessel)
    adv_eps: float = 1e-4
    mu: int = 1
    # passes of a step beyond sampling and the update (none that the math does not need).
    # old log-probs: "auto" = with mu = 1 the sampling policy is the one being updated, so the update uses
    # stop_gradient(its own logp) (ratio 1 in value, the same gradient; as TRL) and no teacher-forced pass
    # runs for them; with mu > 1 they are recomputed. "recompute": always the teacher-forced pass (oracle)
    old_logp: str = field(default="auto", metadata={"choices": ("auto", "recompute")})
    # [RET] embeddings: "sampler" = the final hidden state where the sampler feeds [RET] (sampled, or
    # appended at the budget / in place of EOS), the same vector as "recompute" (the teacher-forced pass)
    ret_embedding: str = field(default="sampler", metadata={"choices": ("sampler", "recompute")})
    # the sampler's KV cache: "compute" = model.dtype (its log-probs and embeddings are then the
    # trainer's up to summation order); "bfloat16" halves the cache of a float32 model
    cache_dtype: str = field(default="compute", metadata={"choices": ("compute", "float32", "bfloat16")})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_summary_tokens: int = 32
    candidate_sampling: str = field(default="per_rollout", metadata={"choices": ("per_rollout", "shared")})
    aux_soft_rank_weight: float = 0.0
    alpha: float = 0.4  # margin reward weight
    epsilon: float = 0.6  # ranking reward weight
    gamma: float = 0.01
    delta: float = 0.05
    soft_temperature: float = 0.01
    log_base: float = math.e  # base of every log in the ranking reward (not stated in the paper)
    prompt_buckets: tuple[int, ...] = (256, 512, 1024)
    steps: int = 0  # 0: one pass over the instances
    lr: float = 1e-6  # paper
    # the policy measured apart from the draw: probe_instances RL instances held out of training (a seeded
    # choice), scored every probe_every steps (and before the first) with a fixed sampling key: expected
    # reward and its parts over G rollouts each, and how often the positive ranks first (metrics.jsonl "probe_*")
    probe_instances: int = 0
    probe_every: int = 10
    # "elva": train the embedder itself (this section); "embed_rl": train a reasoner (`model`, `lora`) whose
    # T-CoT a frozen embedder (`embed_rl.embedder_*`) scores (the `embed_rl` section; elva_jax.rl.embed_rl_trainer)
    recipe: str = field(default="elva", metadata={"choices": ("elva", "embed_rl")})


@dataclasses.dataclass(frozen=True)
class EmbedRLSection:
    """Embed-RL's reward (rl.recipe=embed_rl; `elva_jax.rl.embed_rl_rewards`). Paper / official
    `vlm2vec_reward.py` values: R = 0.05 format + 0.8 ORM + 0.2 PRM, ORM = 0.5 acc margin, negatives
    softmax temperature 0.5, top-n = the row's own-pair count, 4 hard pairs for the judge."""

    format_weight: float = 0.05
    orm_weight: float = 0.8
    prm_weight: float = 0.2
    orm_scale: float = 0.5  # ORM = orm_scale * acc * margin (official `accuracy_weight`)
    negative_temperature: float = 0.5
    top_n: int = 0  # 0: the row's own-pair count (official, = G); > 0: a fixed n
    # ties at the top-n cut (official torch.topk: unspecified): expected share over tie orders, or by column
    ties: str = field(default="average", metadata={"choices": ("average", "index")})
    # the judge (a third, frozen model; `embed_rl.prm_*`) is off by default: PRM = 0 (weights: prm_off_weights)
    prm_enabled: bool = False
    # judge off: keep the weights (official) or scale format + ORM weights up to the full weight sum
    prm_off_weights: str = field(default="keep", metadata={"choices": ("keep", "renormalise")})
    prm_hard_pairs: int = 4  # other pairs shown to the judge next to the pair's own rollouts (official 4)
    # the judge, like the embedder: its own checkpoint and family ("" = a random `prm_random_preset`), tokenizer
    # ("" = the checkpoint's files, else the bundled Qwen2 files); it runs with `model.dtype` / `position_mode`
    prm_checkpoint: str = ""
    prm_random_preset: str = field(
        default="tiny", metadata={"choices": ("tiny", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small")}
    )
    prm_tokenizer: str = ""
    # length buckets of the judge's text prompts (the row's text and CoT + G + prm_hard_pairs candidate CoTs);
    # a prompt longer than the largest is not judged (PRM 0, counted as prm_overlong)
    prm_seq_buckets: tuple[int, ...] = (1024, 4096, 16384)
    prm_max_new_tokens: int = 10  # the judge's greedy answer budget (official: max_tokens 10)
    # judge prompts per sampler call (0: all 2 I G of a step in one call; > 0 bounds the judge's KV cache)
    prm_rows_per_call: int = 0
    # reading the judge's answer: "strict" = the whole answer (stripped) is one number 1..K; "first_integer" =
    # the first run of digits anywhere (official). Anything else (or out of range) = a wrong pick, counted
    prm_answer_parse: str = field(default="strict", metadata={"choices": ("strict", "first_integer")})
    # the listed candidates: "own_first" = the pair's own rollouts, then the hard pairs hardest first (official;
    # a judge that always answers 1 is always right), or "shuffled" = one seeded permutation per row
    prm_candidate_order: str = field(default="own_first", metadata={"choices": ("own_first", "shuffled")})
    # ours (the official judge prompt is not reproduced): the judge's request before the listed reasonings
    prm_instruction: str = TCOT_JUDGE_INSTRUCTION
    # "tags": the official check (the six tags in order, anything around them); "strict": each tag once,
    # nothing outside the blocks, well-formed JSON evidence (`elva_jax.data.tcot`)
    format_check: str = field(default="strict", metadata={"choices": ("strict", "tags")})
    # strict check only: "modality" = the evidence must be the kind the side's modality asks for (key_frames
    # for a video, bbox_2d for an image, text_keywords for text: the official prompts' rule, which the
    # official reward does not check); "any" = any well-formed kind
    evidence_kind: str = field(default="modality", metadata={"choices": ("modality", "any")})
    key_frame_base: int = 1  # index of a video's first frame in `key_frames` (Embed-RL's prompt: 1-based)
    # the frozen embedder, a second model with its own checkpoint and family ("" = a random model of
    # `embedder_random_preset`: tests and tiny runs); it runs with the run's `model.dtype` / `position_mode`
    embedder_checkpoint: str = ""
    embedder_random_preset: str = field(
        default="tiny_qwen3_vl", metadata={"choices": ("tiny", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "small")}
    )
    embedder_tokenizer: str = ""  # "" = the embedder checkpoint's tokenizer files, else the bundled Qwen2 files
    # length buckets of the embedder's rows (side + its CoT + the summarise instruction + <emb>); static shapes
    embedder_seq_buckets: tuple[int, ...] = (256, 512, 1024)
    # rows (of the step's I pairs x 2 sides x G rollouts) per embedder call, 0 = all in one call; must divide
    # 2 I G and be a multiple of the mesh's data x fsdp (ours: bounds the embedder's activations at scale)
    embedder_micro_rows: int = 0
    # ours (the official prompts are not reproduced): what the reasoner is asked after the side's text
    reasoner_instruction: str = TCOT_REASONER_INSTRUCTION
    # ours: what follows the CoT in the embedder's user turn; the embedding is the hidden state at <emb>
    summarise_instruction: str = TCOT_SUMMARISE_INSTRUCTION


@dataclasses.dataclass(frozen=True)
class SFTSection:
    """The summary warm start (train.stages "sft", `elva_jax.rl.warm_start`): next-token training of the
    summary + [RET] after the RL stage's generation prompt, plus InfoNCE on the [RET] embeddings, on the
    (query, positive) pairs that carry target summaries (`query_src_content` / `src_content` "summary").
    Not in the paper, whose policy starts pretrained."""

    steps: int = 200
    batch: int = 16  # (query, positive) pairs per step: 2 x batch sequences
    # weight of InfoNCE (temperature train.tau) between the queries' and positives' [RET] embeddings over
    # their teacher-forced target summaries: the [RET] state learns to read the summary (0: summaries only)
    ret_contrastive_weight: float = 1.0
    lr: float = 1e-3
    # train every parameter (token table and vision tower included: what pretraining shapes); false: a LoRA
    # (the `lora` section), merged into the weights at the end of the stage
    full_finetune: bool = True
    max_target_tokens: int = 32  # target + its stop token; a longer target stops the run at startup, naming it
    # rl.recipe=embed_rl: the reasoner's target T-CoT, a format string with {summary} (one of the side's target
    # summaries) and optionally {alt} (the next of its variants), followed by <|im_end|>; ELVA's target is
    # "{summary} [RET]". Ours: the official warm start (if any) is not published
    target_template: str = "<thinking>{summary}</thinking><rethink>{alt}</rethink><answer>{summary}</answer>"


STAGES = ("sft", "contrastive", "rl")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    stages: tuple[str, ...] = ("contrastive",)  # of STAGES, run in that order: "sft", "contrastive", "rl"
    global_batch: int = 8
    micro_batches: int = 1  # gradient accumulation steps (exact, see elva_jax.train.step)
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the run
    tau: float = 0.05
    # "eol" (LamRA prompt, token before <emb>), "last" (LamRA prompt, last real token), "instruct_last"
    # (Qwen3-VL-Embedding prompt with data.default_instruction, last real token)
    embedding: str = field(default="eol", metadata={"choices": ("eol", "last", "instruct_last")})
    seed: int = 0
    max_nonfinite: int = 10  # stop after this many skipped (non-finite) updates
    # evaluate the final model with these embedding modes (of EMBED_MODES); with an RL stage also the model
    # before it ({run.dir}/eval/before_rl-{mode}), compared in the final results
    eval_modes: tuple[str, ...] = ()
    eval_at_start: bool = False  # also evaluate the starting model (random or loaded) in eval_modes: eval/start-{mode}


@dataclasses.dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    profile_steps: tuple[int, ...] = ()  # (first, last) step window traced with jax.profiler
    resume: bool = True
    # fingerprint fields (elva_jax.runtime.fingerprint) that a resume may change on purpose, e.g.
    # [train.global_batch]; any other difference from the checkpoint stops the resume
    allow_changed: tuple[str, ...] = ()
    # end this invocation after this many steps of the running stage (a checkpoint is saved; the LR
    # schedule still spans the whole run; the same command continues): time-boxed queue jobs. 0 = off
    stop_after_steps: int = 0


def _check_values(c) -> None:
    """Refuse values that cannot be right, naming the field (one ValueError; the loader adds the file)."""
    fin = math.isfinite
    rules = [
        ("optim.lr", fin(c.optim.lr) and c.optim.lr >= 0, "must be a finite number >= 0"),
        ("rl.lr", fin(c.rl.lr) and c.rl.lr >= 0, "must be a finite number >= 0"),
        ("optim.weight_decay", fin(c.optim.weight_decay) and c.optim.weight_decay >= 0, "must be finite and >= 0"),
        ("optim.warmup_ratio", 0 <= c.optim.warmup_ratio <= 1, "must be in [0, 1]"),
        (
            "optim.clip_norm",
            c.optim.clip_norm is None or (fin(c.optim.clip_norm) and c.optim.clip_norm > 0),
            "must be null (no clipping) or > 0",
        ),
        ("lora.dropout", 0 <= c.lora.dropout < 1, "must be in [0, 1)"),
        ("train.tau", fin(c.train.tau) and c.train.tau > 0, "must be > 0 (the InfoNCE temperature)"),
        ("train.global_batch", c.train.global_batch >= 1, "must be >= 1"),
        ("train.micro_batches", c.train.micro_batches >= 1, "must be >= 1"),
        ("train.max_steps", c.train.max_steps >= 0, "must be >= 0 (0: the whole epochs)"),
        ("train.epochs", fin(c.train.epochs) and c.train.epochs > 0, "must be > 0"),
        ("train.max_nonfinite", c.train.max_nonfinite >= 0, "must be >= 0"),
        ("run.checkpoint_every", c.run.checkpoint_every >= 1, "must be >= 1"),
        ("run.keep_checkpoints", c.run.keep_checkpoints >= 1, "must be >= 1"),
        ("run.log_every", c.run.log_every >= 1, "must be >= 1"),
        ("run.stop_after_steps", c.run.stop_after_steps >= 0, "must be >= 0"),
        ("data.seq_buckets", len(c.data.seq_buckets) > 0 and min(c.data.seq_buckets) > 0, "must be non-empty, > 0"),
        (
            "data.source",
            c.data.source == "files" or c.data.kind != "bundled",
            "needs data.kind mbeir or nli (bundled data is generated as files; prepare it and name its files)",
        ),
        ("data.min_pixels", 0 < c.data.min_pixels <= c.data.max_pixels, "must be > 0 and <= data.max_pixels"),
        ("data.video_fps", fin(c.data.video_fps) and c.data.video_fps >= 0, "must be >= 0 (0: every frame)"),
        ("data.video_min_frames", c.data.video_min_frames >= 1, "must be >= 1"),
        ("data.video_max_frames", c.data.video_max_frames >= c.data.video_min_frames, "must be >= video_min_frames"),
        (
            "data.video_min_pixels",
            c.data.video_min_pixels >= 0
            and c.data.video_max_pixels >= 0
            and (not c.data.video_max_pixels or c.data.video_min_pixels <= c.data.video_max_pixels),
            "must be >= 0 (0: the processor default) and <= data.video_max_pixels",
        ),
        # the RL policy samples; 0 would make log-probs and KL undefined (greedy decoding is eval's "greedy")
        ("rl.temperature", fin(c.rl.temperature) and c.rl.temperature > 0, "must be > 0 (the policy samples)"),
        ("rl.top_p", 0 < c.rl.top_p <= 1, "must be in (0, 1]"),
        ("rl.top_k", c.rl.top_k >= 0, "must be >= 0 (0: off)"),
        ("rl.group_size", c.rl.group_size >= 2, "must be >= 2 (group-relative advantages)"),
        ("rl.instances_per_step", c.rl.instances_per_step >= 1, "must be >= 1"),
        ("rl.micro_instances", c.rl.micro_instances >= 0, "must be >= 0 (0: all instances at once)"),
        ("rl.max_summary_tokens", c.rl.max_summary_tokens >= 1, "must be >= 1"),
        ("rl.prompt_buckets", len(c.rl.prompt_buckets) > 0 and min(c.rl.prompt_buckets) > 0, "must be non-empty, > 0"),
        ("rl.steps", c.rl.steps >= 0, "must be >= 0 (0: one pass over the instances)"),
        ("rl.mu", c.rl.mu >= 1, "must be >= 1"),
        ("rl.beta", fin(c.rl.beta) and c.rl.beta >= 0, "must be finite and >= 0"),
        ("rl.log_base", fin(c.rl.log_base) and c.rl.log_base > 1, "must be > 1"),
        (
            "rl.probe_instances",
            c.rl.probe_instances >= 0 and c.rl.probe_instances % c.rl.instances_per_step == 0,
            "must be >= 0 and a multiple of rl.instances_per_step (scored in step-sized chunks: one compile)",
        ),
        ("rl.probe_every", c.rl.probe_every >= 1, "must be >= 1"),
        ("sft.steps", c.sft.steps >= 1, "must be >= 1"),
        ("sft.batch", c.sft.batch >= 1, "must be >= 1"),
        ("sft.lr", fin(c.sft.lr) and c.sft.lr >= 0, "must be a finite number >= 0"),
        (
            "sft.ret_contrastive_weight",
            fin(c.sft.ret_contrastive_weight) and c.sft.ret_contrastive_weight >= 0,
            "must be finite and >= 0",
        ),
        ("sft.max_target_tokens", c.sft.max_target_tokens >= 2, "must be >= 2 (a summary token and [RET])"),
        (
            "sft.target_template",
            _template_ok(c.sft.target_template),
            "must be a format string with {summary} (and optionally {alt}), no other fields",
        ),
        (
            "sft.ret_contrastive_weight",
            not _embed_rl_sft(c) or c.sft.ret_contrastive_weight == 0,
            "must be 0 with rl.recipe=embed_rl (the reasoner does not embed: no [RET] InfoNCE)",
        ),
        *(
            (
                f"embed_rl.{k}",
                fin(field_value(c, f"embed_rl.{k}")) and field_value(c, f"embed_rl.{k}") >= 0,
                "must be >= 0",
            )
            for k in ("format_weight", "orm_weight", "prm_weight", "orm_scale")
        ),
        (
            "embed_rl.negative_temperature",
            fin(c.embed_rl.negative_temperature) and c.embed_rl.negative_temperature > 0,
            "must be > 0",
        ),
        ("embed_rl.top_n", c.embed_rl.top_n >= 0, "must be >= 0 (0: the row's own-pair count)"),
        ("embed_rl.prm_hard_pairs", c.embed_rl.prm_hard_pairs >= 1, "must be >= 1"),
        (
            "embed_rl.embedder_micro_rows",
            c.embed_rl.embedder_micro_rows >= 0
            and (2 * c.rl.instances_per_step * c.rl.group_size) % max(1, c.embed_rl.embedder_micro_rows) == 0,
            f"must be 0 or divide the 2 x rl.instances_per_step x rl.group_size = "
            f"{2 * c.rl.instances_per_step * c.rl.group_size} rows of a step",
        ),
        ("embed_rl.prm_max_new_tokens", c.embed_rl.prm_max_new_tokens >= 1, "must be >= 1"),
        ("embed_rl.prm_rows_per_call", c.embed_rl.prm_rows_per_call >= 0, "must be >= 0 (0: all rows at once)"),
        (
            "embed_rl.prm_seq_buckets",
            len(c.embed_rl.prm_seq_buckets) > 0 and min(c.embed_rl.prm_seq_buckets) > 0,
            "must be non-empty, > 0",
        ),
        ("embed_rl.key_frame_base", c.embed_rl.key_frame_base in (0, 1), "must be 0 or 1"),
        (
            "embed_rl.embedder_seq_buckets",
            len(c.embed_rl.embedder_seq_buckets) > 0 and min(c.embed_rl.embedder_seq_buckets) > 0,
            "must be non-empty, > 0",
        ),
        (
            "embed_rl.prm_off_weights",
            c.embed_rl.prm_off_weights == "keep" or c.embed_rl.format_weight + c.embed_rl.orm_weight > 0,
            "cannot renormalise zero format and ORM weights",
        ),
        (
            "eval.temperature",
            fin(c.eval.temperature) and c.eval.temperature > 0,
            "must be > 0 (eval.sampling=greedy decodes greedily)",
        ),
        ("eval.batch_size", c.eval.batch_size >= 1, "must be >= 1"),
        ("eval.cot_max_tokens", c.eval.cot_max_tokens >= 1, "must be >= 1"),
        ("eval.cot_max_crops", c.eval.cot_max_crops >= 0, "must be >= 0"),
        ("eval.cot_batch_size", c.eval.cot_batch_size >= 0, "must be >= 0 (0: eval.batch_size)"),
        ("eval.cot_temperature", fin(c.eval.cot_temperature) and c.eval.cot_temperature > 0, "must be > 0"),
        ("eval.cot_top_p", 0 < c.eval.cot_top_p <= 1, "must be in (0, 1]"),
        (
            "eval.topk",
            c.eval.tie_order != "faiss" or 1 <= c.eval.topk <= 99,
            "must be in [1, 99] with eval.tie_order=faiss (faiss's heap search; k >= 100 uses its reservoir)",
        ),
        ("data.max_skip_fraction", 0 <= c.data.max_skip_fraction <= 1, "must be in [0, 1]"),
        ("data.bundled_train_scenes", c.data.bundled_train_scenes >= 1, "must be >= 1"),
        ("data.bundled_test_scenes", c.data.bundled_test_scenes >= 1, "must be >= 1"),
        ("data.hard_negatives", c.data.hard_negatives >= 0, "must be >= 0"),
        ("data.max_text_tokens", c.data.max_text_tokens >= 1, "must be >= 1"),
        ("data.patch_rows", c.data.patch_rows >= 0, "must be >= 0 (0: one row per example)"),
        ("data.patch_row_len", c.data.patch_row_len >= 1, "must be >= 1"),
        ("rl.query_fraction", 0 < c.rl.query_fraction <= 1, "must be in (0, 1]"),
        ("rl.num_hard_negatives", c.rl.num_hard_negatives >= 0, "must be >= 0"),
        ("rl.num_random_negatives", c.rl.num_random_negatives >= 0, "must be >= 0"),
        ("rl.eps_low", fin(c.rl.eps_low) and c.rl.eps_low >= 0, "must be finite and >= 0"),
        ("rl.eps_high", fin(c.rl.eps_high) and c.rl.eps_high >= 0, "must be finite and >= 0"),
        ("rl.adv_ddof", 0 <= c.rl.adv_ddof < c.rl.group_size, "must be >= 0 and < rl.group_size"),
        ("rl.adv_eps", fin(c.rl.adv_eps) and c.rl.adv_eps >= 0, "must be finite and >= 0"),
        ("rl.soft_temperature", fin(c.rl.soft_temperature) and c.rl.soft_temperature > 0, "must be > 0"),
    ]
    rules += [
        (f"rl.{k}", fin(field_value(c, f"rl.{k}")), "must be finite")
        for k in (
            "alpha",
            "epsilon",
            "gamma",
            "delta",
            "aux_soft_rank_weight",
            "false_negative_threshold",
            "false_negative_margin",
        )
    ]
    bad = [f"{name} = {field_value(c, name)!r} {why}" for name, ok, why in rules if not ok]
    if bad:
        raise ValueError("; ".join(bad))
    if c.train.global_batch % c.train.micro_batches:
        raise ValueError(
            f"train.global_batch {c.train.global_batch} is not divisible by train.micro_batches {c.train.micro_batches}"
        )


def _embed_rl_sft(c) -> bool:
    """Whether the run's warm start teaches the Embed-RL reasoner (``sft`` stage under rl.recipe=embed_rl)."""
    return c.rl.recipe == "embed_rl" and "sft" in c.train.stages


def _template_ok(template: str) -> bool:
    """Whether ``template`` is a format string whose fields are ``{summary}`` (required) and ``{alt}``."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        template.format(summary="s", alt="a")
    except (ValueError, IndexError, KeyError):
        return False
    return "summary" in names and set(names) <= {"summary", "alt"}


def check_recipe_available(c) -> None:
    """Refuse (ConfigError) up front what the chosen RL recipe cannot run, rather than run something else.

    rl.recipe=embed_rl trains a reasoner against a frozen embedder: no contrastive stage in the same run
    (the embedder is trained contrastively in its own run; `embed_rl.embedder_checkpoint` names its
    export), no embedding evaluation of the reasoner (`train.eval_modes`), and ELVA-only RL options off.
    The judge (`embed_rl.prm_enabled`) and full fine-tuning of the reasoner (`lora.enabled` false) run."""
    if c.rl.recipe != "embed_rl" or "rl" not in c.train.stages:
        return
    bad = []
    if "contrastive" in c.train.stages:
        bad.append(
            "train.stages has 'contrastive': the Embed-RL embedder is trained contrastively in its own run "
            "(rl.recipe=elva, train.stages=[contrastive]) and given by embed_rl.embedder_checkpoint"
        )
    if c.train.eval_modes:
        bad.append("train.eval_modes: the Embed-RL reasoner is not an embedder; leave it empty")
    if c.rl.candidate_sampling != "per_rollout":
        bad.append("rl.candidate_sampling must be per_rollout (every query and positive rollout has its own CoT)")
    if c.rl.aux_soft_rank_weight:
        bad.append("rl.aux_soft_rank_weight is ELVA's (a loss through the policy's own embeddings); set it 0")
    if bad:
        raise ConfigError("rl.recipe=embed_rl: " + "; ".join(bad))


#: RL recipes whose memory plan (`python -m elva_jax.plan`) does not exist yet
RECIPES_WITHOUT_PLAN: tuple[str, ...] = ()  # every recipe's RL stage has its plan programs


def check_plan_available(c) -> None:
    """Refuse (ConfigError) a plan of an RL stage whose recipe has no plan programs (its RL rows would be
    another recipe's), then what `check_recipe_available` refuses."""
    if "rl" in c.train.stages and c.rl.recipe in RECIPES_WITHOUT_PLAN:
        raise ConfigError(
            f"rl.recipe={c.rl.recipe}: no memory plan for this recipe; plan another recipe or drop 'rl' from "
            "train.stages"
        )
    check_recipe_available(c)


def field_value(c, dotted: str):
    """The value of a dotted field ("train.global_batch") of a config."""
    for k in dotted.split("."):
        c = getattr(c, k)
    return c


def project(cls, section, **extra):
    """``cls(**fields)`` with every field of the dataclass ``cls`` that ``section`` also has taken from
    it (plus ``extra``): a smaller config read off the run schema without copying fields by hand."""
    names = {f.name for f in dataclasses.fields(cls)}
    vals = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
    return cls(**{**vals, **extra})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    mesh: MeshSection = MeshSection()
    optim: OptimConfig = OptimConfig()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    run: RunSection = RunSection()
    rl: RLSection = RLSection()
    sft: SFTSection = SFTSection()
    embed_rl: EmbedRLSection = EmbedRLSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        bad = [s for s in self.train.stages if s not in STAGES]
        if bad:
            raise ValueError(f"train.stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
        order = [STAGES.index(s) for s in self.train.stages]
        if order != sorted(set(order)):
            raise ValueError(f"train.stages {list(self.train.stages)}: each stage once, in the order {list(STAGES)}")
        bad = [m for m in self.train.eval_modes if m not in EMBED_MODES]
        if bad:
            raise ValueError(f"train.eval_modes: unknown mode(s) {bad}; choose from {list(EMBED_MODES)}")
        _check_values(self)
        r = self.rl
        if r.micro_instances and r.instances_per_step % r.micro_instances:
            raise ValueError(
                f"rl.micro_instances {r.micro_instances} does not divide rl.instances_per_step {r.instances_per_step}"
            )
