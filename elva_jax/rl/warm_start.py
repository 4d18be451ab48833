"""The summary warm start (``train.stages: [sft, ...]``): teach the model to write a summary of its input
before ``[RET]``, so that the RL stage starts from a generator worth optimising (at paper scale that
is the pretrained Qwen2-VL; a random model samples near-uniform noise over 152k tokens).

A batch is B (query, positive) pairs (`elva_jax.data.summaries`): 2B rows, each the RL stage's
generation prompt (ELVA's ``[RET]`` template with an open assistant turn) followed by one of the side's
target summaries and ``[RET]``. The loss is the mean next-token negative log-likelihood over target
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
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.configlib import ConfigError
from elva_jax.data.prompts import RET_TOKEN
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora, lora_axes, merge_lora
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import init_optimizer, make_mesh, place, tree_shardings
from elva_jax.retrieval.losses import info_nce
from elva_jax.rl.loop import should_stop, step_batches
from elva_jax.rl.rollout import RLConfig, teacher_forced_shared
from elva_jax.rl.trainer import encode_prompts, model_inputs, put_rows
from elva_jax.runtime.checkpointing import Checkpointer, CheckpointIncompatible, abstract_like
from elva_jax.runtime.fingerprint import run_fingerprint
from elva_jax.runtime.observe import MetricsLogger
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.schema import RunConfig, project


def sft_loss(
    trainable, params, batch: dict, *, cfg: ModelConfig, opts: ModelOptions, lora_scale: float, full: bool,
    ret_weight: float, tau: float,
):  # fmt: skip
    """(loss, metrics) of one batch: prompts [2B, P] (model inputs; queries, then their positives), targets
    [2B, T] with lengths [2B] (tokens up to and including [RET]). ``full``: ``trainable`` is the whole
    param tree."""
    base, lora = (trainable, None) if full else (params, trainable)
    logps, emb = teacher_forced_shared(
        base, lora, lora_scale, batch["prompts"], batch["targets"], batch["lengths"], 1, cfg, opts, RLConfig()
    )
    mask = (jnp.arange(batch["targets"].shape[1])[None] < batch["lengths"][:, None]).astype(jnp.float32)
    nll = -(logps * mask).sum() / jnp.maximum(mask.sum(), 1.0)
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


def encode_targets(texts: list[str], tokenizer, ret_id: int, max_tokens: int, names: list[str]) -> list[np.ndarray]:
    """Token ids of each target + [RET]; a target longer than ``max_tokens`` (with [RET]) is a ConfigError
    naming the record (never cut in silence: a cut summary would be taught as a summary)."""
    out = []
    for text, name in zip(texts, names, strict=True):
        ids = np.asarray(tokenizer.ids(f"{text.strip()} {RET_TOKEN}"), np.int32)  # ELVA's "{summary} [RET]"
        if ids[-1] != ret_id:
            raise ConfigError(f"the summary of {name} does not end in [RET] once tokenised: {text!r}")
        if len(ids) > max_tokens:
            raise ConfigError(
                f"sft.max_target_tokens {max_tokens}: the summary of {name} takes {len(ids)} tokens with [RET] "
                f"({text!r}); raise sft.max_target_tokens"
            )
        out.append(ids)
    return out


class SFTBatches:
    """Step s -> the step's host batch: the queries of the step's pairs, then their positives (prompts
    encoded as the RL stage's), targets padded to ``sft.max_target_tokens``; a pure function of
    (records, seed, s)."""

    def __init__(self, records, encoder, tokenizer, mcfg: ModelConfig, opts: ModelOptions, cfg: RunConfig):
        self.records, self.encoder, self.mcfg, self.opts, self.cfg = records, encoder, mcfg, opts, cfg
        s = cfg.sft
        self.order = step_batches(len(records), s.batch, cfg.train.seed)
        self.ret_id, self.T = tokenizer.ret_token_id, s.max_target_tokens
        # every target tokenised once up front: too long a summary stops the run before any step
        self.tokens = [
            [
                encode_targets(ts, tokenizer, self.ret_id, self.T, [f"record {records.entries[i]}"] * len(ts))
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


def run_sft(cfg: RunConfig, mcfg: ModelConfig, params: dict, records, tokenizer, opts: ModelOptions, *, run_dir: str):
    """The warm start's resumable loop. Returns {"params": the trained params (LoRA merged), "steps",
    "total", "stopped", "losses", "wall_s"}."""
    from elva_jax.data.tokenize import PromptEncoder

    s = cfg.sft
    full = s.full_finetune
    lcfg = project(LoraConfig, cfg.lora)
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
    batches = SFTBatches(records, PromptEncoder(tokenizer, "ret", generation=True), tokenizer, mcfg, opts, cfg)
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
        ),  # fmt: skip
        donate_argnums=(0, 1),
    )
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=cfg.run.keep_checkpoints,
        async_save=cfg.run.async_checkpoint,
        with_data_iter=False,
        fingerprint=run_fingerprint(cfg, "sft"),
        allow_changed=cfg.run.allow_changed,
    )
    if ckpt.steps() and not cfg.run.resume:
        raise CheckpointIncompatible(
            f"{ckpt.directory} holds SFT checkpoints (steps {ckpt.steps()}) and run.resume is false: a new run "
            "there would rotate them away; use another run.dir or move them"
        )
    step, skipped = 0, 0
    state = {"trainable": trainable, "opt_state": opt_state, "step": np.int32(0)}
    if ckpt.steps():
        step, state, meta = ckpt.restore_latest(abstract_like(state))
        step, skipped = int(state["step"]), int(meta.get("nonfinite", 0))
        print(f"[elva_jax] SFT: resumed from step {step}", flush=True)
    trainable, opt_state = state["trainable"], state["opt_state"]
    stop = {"flag": False}
    old = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
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
                print(
                    f"[elva_jax] SFT step {step}/{s.steps} loss {loss:.4f} (summary NLL {rec['nll']:.3f}, [RET] "
                    f"InfoNCE {rec['ret_nce']:.3f}, in-batch acc {rec['ret_acc']:.2f}) lr {rec['lr']:.2e} "
                    f"{rec['step_s']:.2f}s",
                    flush=True,
                )
            stop["flag"] = should_stop(stop["flag"], step - step_start, cfg)
            if step % cfg.run.checkpoint_every == 0 or step == s.steps or stop["flag"]:
                state = {"trainable": trainable, "opt_state": opt_state, "step": np.int32(step)}
                ckpt.save(step, state, None, {"loss": loss, "nonfinite": skipped}, force=True)
            if stop["flag"]:
                print(f"[elva_jax] saved SFT step {step} and stopping", flush=True)
                break
    finally:
        ckpt.close()
        logger.close()
        signal.signal(signal.SIGTERM, old)
    out = trainable if full else merge_lora(params, trainable, lcfg)
    return {
        "params": out,
        "steps": step,
        "total": s.steps,
        "stopped": step < s.steps,
        "losses": losses,
        "wall_s": time.perf_counter() - t_start,
    }
