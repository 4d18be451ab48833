"""The summary warm start (``train.stages: [sft, ...]``): teach the model to write a summary of its input
before ``[RET]``, so that the RL stage starts from a generator worth optimising (at paper scale that
is the pretrained Qwen2-VL; a random model samples near-uniform noise over 152k tokens).

A batch is B (query, positive) pairs (`elva_jax.data.summaries`): 2B rows, each the RL stage's
generation prompt followed by a target built from one of the side's target summaries (`TargetSpec`).
ELVA (`elva_target`): its ``[RET]`` template with an open assistant turn, target ``"{summary} [RET]"``.
The Embed-RL reasoner (`reasoner_target`): its T-CoT prompt (`reasoner_encoder`), target
``sft.target_template`` filled with the summary, then ``<|im_end|>``, and no InfoNCE (it does not embed).
The loss is the mean next-token negative log-likelihood over target
tokens plus, weighted by ``sft.ret_contrastive_weight`` w, InfoNCE (temperature ``train.tau``) between
the queries' and the positives' teacher-forced ``[RET]`` embeddings e (in-batch negatives):

    L = - sum_{n,t} m[n,t] log p(y[n,t] | prompt_n, y[n,<t]) / sum_{n,t} m[n,t]
        + w * InfoNCE(e_query, e_positive)

The second term makes the ``[RET]`` state read the summary before it (what a pretrained model's hidden
state does at paper scale; a random one's does not), so better summaries give better rankings: the
lever the RL stage pulls.

computed with the RL stage's teacher-forced pass (`elva_jax.rl.rollout.teacher_forced_shared`, the same
log-probs the GRPO update uses). ``sft.full_finetune`` trains every parameter (the token table and the
vision tower included: what pretraining would have shaped); otherwise a LoRA, merged at the end.

Step s trains on batch s of a seeded endless shuffle of the records and draws each row's target with
``default_rng([seed, s, row])``, so a checkpoint's step is also its data position (exact resume).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.configlib import ConfigError
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.prompts import RET_TOKEN
from elva_jax.data.summaries import SummaryRecords
from elva_jax.data.tcot.encoders import reasoner_encoder
from elva_jax.data.tcot.parser import TAGS
from elva_jax.data.tokenize import generation_vocab
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.lora import init_lora, lora_axes, merge_lora
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import init_optimizer, make_mesh, place, tree_shardings
from elva_jax.retrieval.losses import info_nce
from elva_jax.rl.loop import step_batches
from elva_jax.rl.rollout import RLConfig, teacher_forced_shared
from elva_jax.rl.trainer import encode_prompts, model_inputs, put_rows
from elva_jax.runtime.checkpointing import abstract_like, open_stage_checkpoints
from elva_jax.runtime.models import model_options
from elva_jax.runtime.observe import MetricsLogger
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.runtime.preemption import StopRequest
from elva_jax.schema import RunConfig


def sft_loss(
    trainable, params, batch: dict, *, cfg: ModelConfig, opts: ModelOptions, lora_scale: float, full: bool,
    ret_weight: float, tau: float, ret_nce: bool = True,
):  # fmt: skip
    """(loss, metrics) of one batch: prompts [2B, P] (model inputs; queries, then their positives), targets
    [2B, T] with lengths [2B] (tokens up to and including the stop token). ``full``: ``trainable`` is the
    whole param tree. ``ret_nce`` False: no InfoNCE term (nor its metrics); ``ret_weight`` must then be 0."""
    base, lora = (trainable, None) if full else (params, trainable)
    logps, emb = teacher_forced_shared(
        base, lora, lora_scale, batch["prompts"], batch["targets"], batch["lengths"], 1, cfg, opts, RLConfig()
    )
    mask = (jnp.arange(batch["targets"].shape[1])[None] < batch["lengths"][:, None]).astype(jnp.float32)
    nll = -(logps * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if not ret_nce:
        if ret_weight:
            raise ValueError("sft_loss: ret_weight > 0 needs the InfoNCE term (ret_nce)")
        return nll, {"loss": nll, "nll": nll, "first_token_nll": -logps[:, 0].mean()}
    B = emb.shape[0] // 2
    nce, nm = info_nce(emb[:B], emb[B:], tau)
    loss = nll + ret_weight * nce
    return loss, {
        "loss": loss,
        "nll": nll,
        "ret_nce": nce,
        "ret_acc": nm["acc"],
        "first_token_nll": -logps[:, 0].mean(),
    }


def sft_update(trainable, opt_state, params, batch, *, tx, **kw):
    """One AdamW step on the SFT loss (pure; jit it); a non-finite loss or gradient leaves the state as it
    was (metrics["finite"] False)."""
    (_, m), g = jax.value_and_grad(sft_loss, has_aux=True)(trainable, params, batch, **kw)
    upd, new_opt = tx.update(g, opt_state, trainable)
    finite = jnp.isfinite(m["loss"]) & jnp.isfinite(optax.tree.norm(g))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return keep(optax.apply_updates(trainable, upd), trainable), keep(new_opt, opt_state), {**m, "finite": finite}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How a side's summaries become teacher-forced targets: variant k of n gives the text
    ``template.format(summary=v[k], alt=v[(k + 1) % n]) + stop`` (variants stripped), which must tokenise
    to ids ending in ``stop_id``. ``ret_nce``: whether the loss has the [RET] InfoNCE term."""

    template: str
    stop: str
    stop_id: int
    ret_nce: bool = True

    def texts(self, variants: list[str]) -> list[str]:
        v = [x.strip() for x in variants]
        return [self.template.format(summary=v[k], alt=v[(k + 1) % len(v)]) + self.stop for k in range(len(v))]


def elva_target(tokenizer) -> TargetSpec:
    """ELVA's target: ``"{summary} [RET]"``, with the [RET] InfoNCE term."""
    return TargetSpec("{summary} ", RET_TOKEN, tokenizer.ret_token_id, ret_nce=True)


def reasoner_target(tokenizer, template: str) -> TargetSpec:
    """The Embed-RL reasoner's target: ``template`` (a T-CoT around ``{summary}`` / ``{alt}``), then its
    stop token ``<|im_end|>``; no InfoNCE (the reasoner does not embed)."""
    return TargetSpec(template, "<|im_end|>", tokenizer.im_end_token_id, ret_nce=False)


def reasoner_options(cfg: RunConfig, tokenizer, opts: ModelOptions) -> ModelOptions:
    """``opts`` for the Embed-RL reasoner: with ``model.generation_words`` its generation vocabulary also
    holds the T-CoT tags' tokens (each tag alone and after a space, and ``sft.target_template`` filled with
    each word, so the pieces a tag shares with the word beside it are in); without, the whole vocabulary."""
    words = cfg.model.generation_words
    if not words:
        return opts
    t = cfg.sft.target_template
    texts = [*TAGS, *(" " + x for x in TAGS), *(t.format(summary=w, alt=w) for w in words)]
    return dataclasses.replace(opts, vocab=generation_vocab(tokenizer, words, texts))


def encode_targets(texts: list[str], tokenizer, max_tokens: int, names: list[str], spec: TargetSpec) -> list:
    """Token ids of each summary's target (``spec``); a target longer than ``max_tokens`` (with its stop
    token) is a ConfigError naming the record (never cut in silence: a cut summary would be taught as a
    summary)."""
    out = []
    for full, name in zip(spec.texts(list(texts)), names, strict=True):
        ids = np.asarray(tokenizer.ids(full), np.int32)
        if ids[-1] != spec.stop_id:
            raise ConfigError(f"the target of {name} does not end in {spec.stop} once tokenised: {full!r}")
        if len(ids) > max_tokens:
            raise ConfigError(
                f"sft.max_target_tokens {max_tokens}: the target of {name} takes {len(ids)} tokens with "
                f"{spec.stop} ({full!r}); raise sft.max_target_tokens"
            )
        out.append(ids)
    return out


class SFTBatches:
    """Step s -> the step's host batch: the queries of the step's pairs, then their positives (prompts
    encoded as the RL stage's), targets padded to ``sft.max_target_tokens``; a pure function of
    (records, seed, s). ``spec``: the targets (`TargetSpec`; None: ELVA's, `elva_target`)."""

    def __init__(self, records, encoder, tokenizer, mcfg: ModelConfig, opts: ModelOptions, cfg: RunConfig, spec=None):
        self.records, self.encoder, self.mcfg, self.opts, self.cfg = records, encoder, mcfg, opts, cfg
        s = cfg.sft
        self.order = step_batches(len(records), s.batch, cfg.train.seed)
        self.spec = spec or elva_target(tokenizer)
        self.T = s.max_target_tokens
        # every target tokenised once up front: too long a summary stops the run before any step
        self.tokens = [
            [
                encode_targets(ts, tokenizer, self.T, [f"record {records.entries[i]}"] * len(ts), self.spec)
                for ts in pair
            ]
            for i, pair in enumerate(records.targets)
        ]
        if opts.vocab:  # a target the generation vocabulary cannot write would be taught at logit -1e9
            allowed = set(opts.vocab)
            for i, pair in enumerate(self.tokens):
                for texts, choices in zip(records.targets[i], pair, strict=True):
                    for text, t in zip(texts, choices, strict=True):
                        bad = sorted({int(x) for x in t} - allowed)
                        if bad:
                            raise ConfigError(
                                f"model.generation_words: the summary {text!r} of record {records.entries[i]} uses "
                                f"tokens {[tokenizer.decode([b]) for b in bad]} outside the generation vocabulary; "
                                "add the words"
                            )

    def __call__(self, step: int) -> dict:
        idx = [int(i) for i in self.order[step]]
        recs = [self.records[i] for i in idx]
        sides = [r["sides"][0] for r in recs] + [r["sides"][1] for r in recs]
        d = self.cfg.data
        ids, am, pvs, grids = encode_prompts(
            sides,
            self.encoder,
            min_pixels=d.min_pixels,
            max_pixels=d.max_pixels,
            buckets=tuple(sorted(self.cfg.rl.prompt_buckets)),
            pad_id=self.encoder.tokenizer.pad_token_id,
            geometry=self.mcfg.vision.geometry,
        )
        prompts = model_inputs(self.mcfg, self.opts, ids, am, pvs, grids, d.patch_row_len)
        B = len(idx)
        targets = np.zeros((2 * B, self.T), np.int32)
        lengths = np.zeros(2 * B, np.int32)
        for row in range(2 * B):
            choices = self.tokens[idx[row % B]][row // B]
            pick = int(np.random.default_rng([self.cfg.train.seed, step, row]).integers(len(choices)))
            t = choices[pick]
            targets[row, : len(t)], lengths[row] = t, len(t)
        return {"prompts": prompts, "targets": targets, "lengths": lengths}


def sft_recipe(cfg: RunConfig, tokenizer):
    """(prompt encoder, `TargetSpec`) of the run's RL recipe: ELVA's [RET] generation prompt and target, or
    under ``rl.recipe=embed_rl`` the reasoner's T-CoT prompt and ``sft.target_template``."""
    if cfg.rl.recipe == "embed_rl":
        return reasoner_encoder(tokenizer, cfg.embed_rl.reasoner_instruction), reasoner_target(
            tokenizer, cfg.sft.target_template
        )
    return PromptEncoder(tokenizer, "ret", generation=True), elva_target(tokenizer)


def run_sft(
    cfg: RunConfig, mcfg: ModelConfig, params: dict, records, tokenizer, opts: ModelOptions, *, run_dir: str,
    encoder=None, spec: TargetSpec | None = None,
):  # fmt: skip
    """The warm start's resumable loop; ``encoder`` / ``spec``: the prompts and targets (None: the run's
    recipe's, `sft_recipe`). Returns {"params": the trained params (LoRA merged), "steps", "total",
    "stopped", "losses", "wall_s"}."""
    if encoder is None or spec is None:
        enc0, spec0 = sft_recipe(cfg, tokenizer)
        encoder, spec = encoder or enc0, spec or spec0
    s = cfg.sft
    if s.ret_contrastive_weight and not spec.ret_nce:
        raise ConfigError(
            "sft.ret_contrastive_weight must be 0 for targets without [RET] (the reasoner does not embed)"
        )
    full = s.full_finetune
    lcfg = cfg.lora
    ocfg = dataclasses.replace(cfg.optim, lr=s.lr)
    tx = make_optimizer(ocfg, s.steps)
    lr_at = schedule(ocfg, s.steps)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    params = place(params, tree_shardings(logical_axes(mcfg), params, mesh))
    key = jax.random.key(cfg.train.seed + 29)
    if full:
        trainable = jax.tree.map(jnp.copy, params)
    else:
        lora = init_lora(mcfg, lcfg, key, dtype=cfg.model.param_dtype)
        trainable = place(lora, tree_shardings(lora_axes(mcfg, lcfg), lora, mesh))
    opt_state = init_optimizer(tx, trainable, mesh)
    batches = SFTBatches(records, encoder, tokenizer, mcfg, opts, cfg, spec)
    update = jax.jit(
        lambda tr, st, p, b: sft_update(
            tr,
            st,
            p,
            b,
            tx=tx,
            cfg=mcfg,
            opts=opts,
            lora_scale=lcfg.scale,
            full=full,
            ret_weight=s.ret_contrastive_weight,
            tau=cfg.train.tau,
            ret_nce=spec.ret_nce,
        ),  # fmt: skip
        donate_argnums=(0, 1),
    )
    kind = "embed_rl_sft" if cfg.rl.recipe == "embed_rl" else "sft"
    ckpt = open_stage_checkpoints(cfg, run_dir, kind, with_data_iter=False)
    step, skipped = 0, 0
    state = {"trainable": trainable, "opt_state": opt_state, "step": np.int32(0)}
    if ckpt.steps():
        step, state, meta = ckpt.restore_latest(abstract_like(state))
        step, skipped = int(state["step"]), int(meta.get("nonfinite", 0))
        print(f"[elva_jax] SFT: resumed from step {step}", flush=True)
    trainable, opt_state = state["trainable"], state["opt_state"]
    stop = StopRequest(cfg.run.stop_after_steps).install()
    logger = MetricsLogger(run_dir)
    losses, t_start, step_start = [], time.perf_counter(), step
    try:
        while step < s.steps:
            t0 = time.perf_counter()
            host = batches(step)
            batch = {
                "prompts": put_rows(host["prompts"], mesh, prompts=True),
                "targets": put_rows(host["targets"], mesh),
                "lengths": put_rows(host["lengths"], mesh),
            }
            trainable, opt_state, m = update(trainable, opt_state, params, batch)
            loss = float(m["loss"])
            step += 1
            skipped += int(not bool(m["finite"]))
            if skipped > cfg.train.max_nonfinite:
                raise FloatingPointError(
                    f"SFT stage: {skipped} non-finite updates (train.max_nonfinite {cfg.train.max_nonfinite}); "
                    "the last checkpoint is kept"
                )
            losses.append(loss)
            rec = {k: float(v) for k, v in m.items() if k != "finite"}
            rec.update(lr=float(lr_at(step - 1)), step_s=time.perf_counter() - t0, skipped=skipped)
            if step % cfg.run.log_every == 0 or step == s.steps:
                logger.log(step, rec)
                nce = ""
                if "ret_nce" in rec:
                    nce = f", [RET] InfoNCE {rec['ret_nce']:.3f}, in-batch acc {rec['ret_acc']:.2f}"
                print(
                    f"[elva_jax] SFT step {step}/{s.steps} loss {loss:.4f} (target NLL {rec['nll']:.3f}{nce}) "
                    f"lr {rec['lr']:.2e} {rec['step_s']:.2f}s",
                    flush=True,
                )
            stopping = stop.after_step(step - step_start)
            if step % cfg.run.checkpoint_every == 0 or step == s.steps or stopping:
                state = {"trainable": trainable, "opt_state": opt_state, "step": np.int32(step)}
                ckpt.save(step, state, None, {"loss": loss, "nonfinite": skipped}, force=True)
            if stopping:
                print(f"[elva_jax] saved SFT step {step} and stopping", flush=True)
                break
    finally:
        ckpt.close()
        logger.close()
        stop.restore()
    out = trainable if full else merge_lora(params, trainable, lcfg)
    return {
        "params": out,
        "steps": step,
        "total": s.steps,
        "stopped": step < s.steps,
        "losses": losses,
        "wall_s": time.perf_counter() - t_start,
    }


def run_sft_stage(cfg: RunConfig, records, mcfg, params, tokenizer) -> dict:
    """The summary warm start on the sides of ``records`` that carry target summaries."""
    if cfg.data.kind == "nli":
        raise ConfigError("train.stages 'sft' needs M-BEIR-format data with summaries (data.kind mbeir or bundled)")
    sft_records = SummaryRecords(records)
    if not len(sft_records):
        raise ConfigError(
            f"train.stages has 'sft' but none of the {sft_records.records_seen} training records has target summaries "
            "on its query and positive (query_src_content / src_content with a 'summary' string or list)"
        )
    print(
        f"[elva_jax] SFT: {len(sft_records)} of {sft_records.records_seen} training records (query + positive) carry "
        "target summaries; "
        f"{cfg.sft.steps} steps of {cfg.sft.batch} ({'full fine-tuning' if cfg.sft.full_finetune else 'LoRA'}"
        + (f", the Embed-RL reasoner's T-CoT {cfg.sft.target_template!r})" if cfg.rl.recipe == "embed_rl" else ")"),
        flush=True,
    )
    opts = model_options(cfg, tokenizer)
    if cfg.rl.recipe == "embed_rl":  # the reasoner's vocabulary: its T-CoT tags too
        opts = reasoner_options(cfg, tokenizer, model_options(cfg))
    ss = run_sft(cfg, mcfg, params, sft_records, tokenizer, opts, run_dir=os.path.join(cfg.run.dir, "sft"))
    return {**ss, "records": len(sft_records), "records_seen": sft_records.records_seen}
