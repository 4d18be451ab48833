"""The stage-ordering, warm-start and run-directory sections of the run schema."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from elva_jax.configlib import FINGERPRINT_ALL
from elva_jax.data.conventions import TRAINABLE

STAGES = ("sft", "contrastive", "rl")


@dataclasses.dataclass(frozen=True)
class SFTSection:
    """The summary warm start (train.stages "sft", `elva_jax.rl.warm_start`): next-token training of the
    summary + [RET] after the RL stage's generation prompt, plus InfoNCE on the [RET] embeddings, on the
    (query, positive) pairs that carry target summaries (`query_src_content` / `src_content` "summary").
    Not in the paper, whose policy starts pretrained."""

    steps: int = 200
    # (query, positive) pairs per step: 2 x batch sequences
    batch: int = field(default=16, metadata={"fingerprint": ("sft", "embed_rl_sft")})
    # weight of InfoNCE (temperature train.tau) between the queries' and positives' [RET] embeddings over
    # their teacher-forced target summaries: the [RET] state learns to read the summary (0: summaries only)
    ret_contrastive_weight: float = field(default=1.0, metadata={"fingerprint": ("sft", "embed_rl_sft")})
    lr: float = 1e-3
    # train every parameter (token table and vision tower included: what pretraining shapes); false: a LoRA
    # (the `lora` section), merged into the weights at the end of the stage
    full_finetune: bool = field(default=True, metadata={"fingerprint": ("sft", "embed_rl_sft")})
    # target + its stop token; a longer target stops the run at startup, naming it
    max_target_tokens: int = field(default=32, metadata={"fingerprint": ("sft", "embed_rl_sft")})
    # rl.recipe=embed_rl: the reasoner's target T-CoT, a format string with {summary} (one of the side's target
    # summaries) and optionally {alt} (the next of its variants), followed by <|im_end|>; ELVA's target is
    # "{summary} [RET]". Ours: the official warm start (if any) is not published
    target_template: str = field(
        default="<thinking>{summary}</thinking><rethink>{alt}</rethink><answer>{summary}</answer>",
        metadata={"fingerprint": ("embed_rl_sft",)},
    )


@dataclasses.dataclass(frozen=True)
class TrainSection:
    stages: tuple[str, ...] = ("contrastive",)  # of STAGES, run in that order: "sft", "contrastive", "rl"
    global_batch: int = field(default=8, metadata={"fingerprint": ("contrastive",)})
    micro_batches: int = 1  # gradient accumulation steps (exact, see elva_jax.contrastive.step)
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the run
    tau: float = 0.05
    # "eol" (LamRA prompt, token before <emb>), "last" (LamRA prompt, last real token), "instruct_last"
    # (Qwen3-VL-Embedding prompt with data.default_instruction, last real token)
    embedding: str = field(default="eol", metadata={"choices": TRAINABLE, "fingerprint": ("contrastive",)})
    seed: int = field(default=0, metadata={"fingerprint": FINGERPRINT_ALL})
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
