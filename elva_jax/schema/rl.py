"""The RL stage sections of the run schema: ELVA (`rl`) and Embed-RL's reward and frozen models (`embed_rl`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from elva_jax.data.conventions import MINING
from elva_jax.data.prompts import TCOT_JUDGE_INSTRUCTION, TCOT_REASONER_INSTRUCTION, TCOT_SUMMARISE_INSTRUCTION
from elva_jax.model.tiny import RANDOM_PRESETS


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """ELVA's reward hyperparameters (the base of the ``rl`` section; `elva_jax.rl.rewards`).

    Attributes:
      alpha: weight of the margin reward (paper: 0.4).
      epsilon: weight of the ranking reward (paper: 0.6).
      gamma: weight of the negative-ranking term; not given by the paper. Default 0.01: with ~100
        negatives of cosine ~0.3 and natural-log weights ``log k - 1`` averaging ~2.7 over
        k = 2..101, the negative sum is ~80, so ``gamma = 0.01`` puts that term (~0.8) on the same
        scale as the positive term ``s_pos / (1 + log r) <= 1`` instead of swamping it.
      delta: margin of the margin reward; not given. Default 0.05: the InfoNCE temperature of
        stages 1-2, i.e. the similarity gap the contrastive model was trained to resolve.
      log_base: base of every ``log`` in the ranking reward; not given. Default ``e``.
      soft_temperature: temperature of the soft ranks used by the auxiliary soft-ranking loss. Default
        0.01: a fifth of ``delta``, so gaps the margin reward cares about are resolved almost like
        hard comparisons, while per-pair gradients (at most ``1 / (4 t)``) stay moderate.
    """

    alpha: float = 0.4
    epsilon: float = 0.6
    gamma: float = 0.01
    delta: float = 0.05
    log_base: float = math.e
    soft_temperature: float = 0.01

    def __post_init__(self) -> None:
        for name in ("alpha", "epsilon", "gamma", "delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"rl.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.log_base > 1:
            raise ValueError(f"rl.log_base must be > 1, got {self.log_base!r}")
        if not self.soft_temperature > 0:
            raise ValueError(f"rl.soft_temperature must be > 0, got {self.soft_temperature!r}")


_RL = ("rl", "embed_rl")  # fingerprint marks: the RL checkpoints of both recipes


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The GRPO step's hyperparameters (the base of the ``rl`` section; `elva_jax.rl.rollout`): paper values
    where stated (G 8, beta 0.2, 50 hard + 50 random negatives), named defaults where not."""

    group_size: int = field(default=8, metadata={"fingerprint": _RL})  # G (paper)
    num_hard_negatives: int = field(default=50, metadata={"fingerprint": _RL})  # paper: 50 hard + 50 random
    num_random_negatives: int = field(default=50, metadata={"fingerprint": _RL})
    false_negative_threshold: float = 0.95  # a threshold (paper), its value unstated
    beta: float = 0.2  # KL weight (paper)
    eps_low: float = 0.2  # clip range (not stated in the paper)
    eps_high: float = 0.2
    kl_estimator: str = field(default="k3", metadata={"choices": ("k1", "k2", "k3")})  # k3: never negative
    # weight the KL term by the importance ratio (TRL's use_bias_correction_kl, True by default in TRL 1.16;
    # False here: DeepSeekMath's GRPO, which the paper cites, has the plain KL term)
    kl_bias_correction: bool = False
    loss_type: str = field(default="grpo", metadata={"choices": ("grpo", "bnpo", "dapo", "dr_grpo")})  # TRL's names
    adv_ddof: int = 0  # 0: population std over the G rewards; TRL's torch std is ddof 1 (Bessel)
    adv_eps: float = 1e-4
    # advantage normalisation: std over each group (TRL's default), over the whole batch, or none
    adv_scale: str = field(default="group", metadata={"choices": ("group", "batch", "none")})
    mu: int = 1  # policy updates per batch of rollouts (old log-probs stored when > 1)
    temperature: float = 1.0  # sampling temperature (not stated)
    top_p: float = 1.0
    top_k: int = 0
    max_summary_tokens: int = 32  # not stated
    candidate_sampling: str = field(default="per_rollout", metadata={"choices": ("per_rollout", "shared")})
    aux_soft_rank_weight: float = 0.0  # optional differentiable ranking loss through the embeddings
    logp_chunk: int = 16  # rows per chunk when computing log-probs over the vocabulary
    # instances per gradient micro-batch of the update (0: all instances_per_step at once); the
    # gradient is exactly the one-pass gradient, with one micro-batch's activations in memory
    micro_instances: int = 0
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

    def recompute_old_logp(self) -> bool:
        """Whether a step needs the teacher-forced pass for the old log-probs: with mu = 1 they equal the
        current policy's, so the update uses stop_gradient(logp) (ratio 1, the same gradient)."""
        if self.old_logp not in ("auto", "recompute"):
            raise ValueError(f"rl.old_logp must be 'auto' or 'recompute', got {self.old_logp!r}")
        return self.old_logp == "recompute" or self.mu > 1


@dataclasses.dataclass(frozen=True)
class RLSection(RLConfig, RewardConfig):
    """Stage 3: the GRPO step (`RLConfig`) and ELVA's reward (`RewardConfig`), plus what the stage feeds them.
    Paper values: G 8, beta 0.2, LR 1e-6, 50 hard + 50 random negatives, alpha 0.4, epsilon 0.6. Everything
    else is not stated in the paper: named defaults."""

    instances_per_step: int = field(default=1, metadata={"fingerprint": _RL})
    # share of each training set used as RL instances (paper: ~1 %)
    query_fraction: float = field(default=0.01, metadata={"fingerprint": _RL})
    negatives: str = field(default="mined", metadata={"choices": ("mined", "dataset"), "fingerprint": _RL})
    # "mined": the embedding convention the queries and pool are mined in (LamRA EOL, or Qwen3-VL-Embedding's)
    mining_embedding: str = field(default="eol", metadata={"choices": MINING})
    # likely false negatives left out of the mined hard negatives: "absolute" drops scores above
    # false_negative_threshold (cosine, the mining embedding); "relative" drops scores above
    # s_pos - false_negative_margin (s_pos: the query's best positive; UniME / Qwen3-VL-Embedding-style)
    false_negative_filter: str = field(default="absolute", metadata={"choices": ("absolute", "relative")})
    false_negative_margin: float = 0.1
    prompt_buckets: tuple[int, ...] = (256, 512, 1024)
    steps: int = 0  # 0: one pass over the instances
    lr: float = 1e-6  # paper
    # the policy measured apart from the draw: probe_instances RL instances held out of training (a seeded
    # choice), scored every probe_every steps (and before the first) with a fixed sampling key: expected
    # reward and its parts over G rollouts each, and how often the positive ranks first (metrics.jsonl "probe_*")
    probe_instances: int = field(default=0, metadata={"fingerprint": _RL})
    probe_every: int = 10
    # "elva": train the embedder itself (this section); "embed_rl": train a reasoner (`model`, `lora`) whose
    # T-CoT a frozen embedder (`embed_rl.embedder_*`) scores (the `embed_rl` section; elva_jax.rl.recipes)
    recipe: str = field(
        default="elva", metadata={"choices": ("elva", "embed_rl"), "fingerprint": ("embed_rl", "embed_rl_sft")}
    )


#: Embed-RL's rules for ties at the top-n cut, and for the weights with the judge off
TIES = ("average", "index")
PRM_OFF_WEIGHTS = ("keep", "renormalise")


@dataclasses.dataclass(frozen=True)
class EmbedRLRewardConfig:
    """Embed-RL's reward (the base of the ``embed_rl`` section; `elva_jax.rl.embed_rl_rewards`). Paper /
    official `vlm2vec_reward.py` values: R = 0.05 format + 0.8 ORM + 0.2 PRM, ORM = 0.5 acc margin,
    negatives softmax temperature 0.5, top-n = the row's own-pair count."""

    format_weight: float = 0.05
    orm_weight: float = 0.8
    prm_weight: float = 0.2
    orm_scale: float = 0.5  # ORM = orm_scale * acc * margin (official `accuracy_weight`)
    negative_temperature: float = 0.5  # t of the softmax over negatives in the margin
    top_n: int = 0  # 0: the row's own-pair count (official, = G); > 0: a fixed n
    # ties at the top-n cut (official torch.topk: unspecified): expected share over tie orders, or by column
    ties: str = field(default="average", metadata={"choices": TIES})
    # the judge (a third, frozen model; `embed_rl.prm_*`) is off by default: PRM = 0 (weights: prm_off_weights)
    prm_enabled: bool = field(default=False, metadata={"fingerprint": ("embed_rl",)})
    # judge off: keep the weights (official: the PRM term vanishes) or scale format + ORM weights up to the
    # full weight sum (a uniform scale of R; group-std-normalised advantages are unchanged by it)
    prm_off_weights: str = field(default="keep", metadata={"choices": PRM_OFF_WEIGHTS})

    def __post_init__(self) -> None:
        for name in ("format_weight", "orm_weight", "prm_weight", "orm_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"embed_rl.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.negative_temperature > 0:
            raise ValueError(f"embed_rl.negative_temperature must be > 0, got {self.negative_temperature!r}")
        if self.top_n < 0:
            raise ValueError(f"embed_rl.top_n must be >= 0 (0: the own-pair count), got {self.top_n!r}")
        if self.ties not in TIES:
            raise ValueError(f"embed_rl.ties must be one of {list(TIES)}, got {self.ties!r}")
        if self.prm_off_weights not in PRM_OFF_WEIGHTS:
            raise ValueError(f"embed_rl.prm_off_weights must be one of {list(PRM_OFF_WEIGHTS)}")
        if self.format_weight + self.orm_weight == 0 and self.prm_off_weights == "renormalise":
            raise ValueError("embed_rl.prm_off_weights = renormalise cannot renormalise zero format and ORM weights")


@dataclasses.dataclass(frozen=True)
class EmbedRLSection(EmbedRLRewardConfig):
    """Embed-RL (rl.recipe=embed_rl): its reward (`EmbedRLRewardConfig`), the T-CoT format check, and the
    frozen models: the embedder and the judge (PRM; 4 hard pairs shown to it, official)."""

    prm_hard_pairs: int = 4  # other pairs shown to the judge next to the pair's own rollouts (official 4)
    # the judge, like the embedder: its own checkpoint and family ("" = a random `prm_random_preset`), tokenizer
    # ("" = the checkpoint's files, else the bundled Qwen2 files); it runs with `model.dtype` / `position_mode`
    prm_checkpoint: str = field(default="", metadata={"fingerprint": ("embed_rl",)})
    prm_random_preset: str = field(default="tiny", metadata={"choices": RANDOM_PRESETS, "fingerprint": ("embed_rl",)})
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
    prm_instruction: str = field(default=TCOT_JUDGE_INSTRUCTION, metadata={"fingerprint": ("embed_rl",)})
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
    embedder_checkpoint: str = field(default="", metadata={"fingerprint": ("embed_rl",)})
    embedder_random_preset: str = field(
        default="tiny_qwen3_vl", metadata={"choices": RANDOM_PRESETS, "fingerprint": ("embed_rl",)}
    )
    embedder_tokenizer: str = ""  # "" = the embedder checkpoint's tokenizer files, else the bundled Qwen2 files
    # length buckets of the embedder's rows (side + its CoT + the summarise instruction + <emb>); static shapes
    embedder_seq_buckets: tuple[int, ...] = (256, 512, 1024)
    # rows (of the step's I pairs x 2 sides x G rollouts) per embedder call, 0 = all in one call; must divide
    # 2 I G and be a multiple of the mesh's data x fsdp (ours: bounds the embedder's activations at scale)
    embedder_micro_rows: int = 0
    # ours (the official prompts are not reproduced): what the reasoner is asked after the side's text
    reasoner_instruction: str = field(
        default=TCOT_REASONER_INSTRUCTION, metadata={"fingerprint": ("embed_rl", "embed_rl_sft")}
    )
    # ours: what follows the CoT in the embedder's user turn; the embedding is the hidden state at <emb>
    summarise_instruction: str = field(default=TCOT_SUMMARISE_INSTRUCTION, metadata={"fingerprint": ("embed_rl",)})
