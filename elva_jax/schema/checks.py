"""Value rules of the run schema: what cannot be right is refused, naming the field (one ValueError listing
every bad value; the loader adds the file)."""

from __future__ import annotations

import math
import string

from elva_jax.configlib import ConfigError
from elva_jax.schema.fields import field_value

fin = math.isfinite


def _optim_rules(c) -> list:
    """(field, ok, why) rules of the optimizer."""
    return [
        ("optim.lr", fin(c.optim.lr) and c.optim.lr >= 0, "must be a finite number >= 0"),
        ("optim.weight_decay", fin(c.optim.weight_decay) and c.optim.weight_decay >= 0, "must be finite and >= 0"),
        ("optim.warmup_ratio", 0 <= c.optim.warmup_ratio <= 1, "must be in [0, 1]"),
        (
            "optim.clip_norm",
            c.optim.clip_norm is None or (fin(c.optim.clip_norm) and c.optim.clip_norm > 0),
            "must be null (no clipping) or > 0",
        ),
    ]


def _rl_rules(c) -> list:
    """(field, ok, why) rules of the ELVA RL stage."""
    return [
        ("rl.lr", fin(c.rl.lr) and c.rl.lr >= 0, "must be a finite number >= 0"),
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
        ("rl.query_fraction", 0 < c.rl.query_fraction <= 1, "must be in (0, 1]"),
        ("rl.num_hard_negatives", c.rl.num_hard_negatives >= 0, "must be >= 0"),
        ("rl.num_random_negatives", c.rl.num_random_negatives >= 0, "must be >= 0"),
        ("rl.eps_low", fin(c.rl.eps_low) and c.rl.eps_low >= 0, "must be finite and >= 0"),
        ("rl.eps_high", fin(c.rl.eps_high) and c.rl.eps_high >= 0, "must be finite and >= 0"),
        ("rl.adv_ddof", 0 <= c.rl.adv_ddof < c.rl.group_size, "must be >= 0 and < rl.group_size"),
        ("rl.adv_eps", fin(c.rl.adv_eps) and c.rl.adv_eps >= 0, "must be finite and >= 0"),
        ("rl.soft_temperature", fin(c.rl.soft_temperature) and c.rl.soft_temperature > 0, "must be > 0"),
    ] + [
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


def _train_rules(c) -> list:
    """(field, ok, why) rules of the contrastive stage and the stage list."""
    return [
        ("train.tau", fin(c.train.tau) and c.train.tau > 0, "must be > 0 (the InfoNCE temperature)"),
        ("train.global_batch", c.train.global_batch >= 1, "must be >= 1"),
        ("train.micro_batches", c.train.micro_batches >= 1, "must be >= 1"),
        ("train.max_steps", c.train.max_steps >= 0, "must be >= 0 (0: the whole epochs)"),
        ("train.epochs", fin(c.train.epochs) and c.train.epochs > 0, "must be > 0"),
        ("train.max_nonfinite", c.train.max_nonfinite >= 0, "must be >= 0"),
    ]


def _run_rules(c) -> list:
    """(field, ok, why) rules of the run directory."""
    return [
        ("run.checkpoint_every", c.run.checkpoint_every >= 1, "must be >= 1"),
        ("run.keep_checkpoints", c.run.keep_checkpoints >= 1, "must be >= 1"),
        ("run.log_every", c.run.log_every >= 1, "must be >= 1"),
        ("run.stop_after_steps", c.run.stop_after_steps >= 0, "must be >= 0"),
    ]


def _data_rules(c) -> list:
    """(field, ok, why) rules of the data."""
    return [
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
        ("data.max_skip_fraction", 0 <= c.data.max_skip_fraction <= 1, "must be in [0, 1]"),
        ("data.bundled_train_scenes", c.data.bundled_train_scenes >= 1, "must be >= 1"),
        ("data.bundled_test_scenes", c.data.bundled_test_scenes >= 1, "must be >= 1"),
        ("data.hard_negatives", c.data.hard_negatives >= 0, "must be >= 0"),
        ("data.max_text_tokens", c.data.max_text_tokens >= 1, "must be >= 1"),
        ("data.patch_rows", c.data.patch_rows >= 0, "must be >= 0 (0: one row per example)"),
        ("data.patch_row_len", c.data.patch_row_len >= 1, "must be >= 1"),
    ]


def _sft_rules(c) -> list:
    """(field, ok, why) rules of the warm start."""
    return [
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
    ]


def _embed_rl_rules(c) -> list:
    """(field, ok, why) rules of Embed-RL."""
    return [
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
    ]


def _eval_rules(c) -> list:
    """(field, ok, why) rules of evaluation."""
    return [
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
    ]


def check_values(c) -> None:
    """Refuse values that cannot be right, naming the field (one ValueError; the loader adds the file)."""
    rules = [
        r
        for rules_of in (
            _optim_rules,
            _rl_rules,
            _train_rules,
            _run_rules,
            _data_rules,
            _sft_rules,
            _embed_rl_rules,
            _eval_rules,
        )
        for r in rules_of(c)
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
