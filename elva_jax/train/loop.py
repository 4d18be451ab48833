"""The contrastive training loop: mesh, sharded state, jitted step, Orbax checkpoints, logs, SIGTERM.

`train(cfg, model_cfg, params, data_iter, total_steps, ...)` runs on whatever batches the Grain
iterator yields ({"query": inputs[A, ...], "cand": inputs[A, ...]} numpy dicts, host-local); the
data module builds that iterator from the config. Resuming restores state and iterator together,
so an interrupted run continues with the same batches and RNG (identical loss curve).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.configlib import ConfigError
from elva_jax.data.tokenize import generation_vocab
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.lora import LoraConfig, init_lora, lora_axes
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import (
    init_optimizer,
    make_mesh,
    mesh_or_replicated,
    place,
    replicated,
    tree_shardings,
)
from elva_jax.runtime.checkpointing import Checkpointer, CheckpointIncompatible, abstract_like
from elva_jax.runtime.fingerprint import run_fingerprint
from elva_jax.runtime.observe import MetricsLogger, Profiler, device_peak_flops, lowered_flops, unrolled
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.runtime.preemption import StopRequest
from elva_jax.schema import RunConfig, project
from elva_jax.train.step import StepConfig, TrainState, batch_shardings, split_lm_head, train_step


def model_options(cfg: RunConfig, tokenizer=None) -> ModelOptions:
    """The model's run options from ``cfg.model``; with ``tokenizer`` also the generation vocabulary of
    ``model.generation_words`` (what generates: summaries, rollouts; embeddings do not need it)."""
    m = cfg.model
    vocab = generation_vocab(tokenizer, m.generation_words) if tokenizer is not None else ()
    return ModelOptions(
        dtype=m.dtype, param_dtype=m.param_dtype, position_mode=m.position_mode, remat=m.remat, vocab=vocab
    )


SEQ_KEYS = ("input_ids", "attention_mask", "positions")  # arrays whose last axis is the padded length


def pad_to_length(group: dict, length: int) -> dict:
    """Right-pad a group's token arrays (input_ids, attention_mask, positions) to ``length``; the new
    slots are masked out (attention_mask 0, token and position 0). Other arrays are unchanged."""
    out = dict(group)
    for k in SEQ_KEYS:
        if k in group and group[k].shape[-1] < length:
            pad = [(0, 0)] * (group[k].ndim - 1) + [(0, length - group[k].shape[-1])]
            out[k] = np.pad(group[k], pad)
    return out


def agree_lengths(host_batch: dict) -> dict:
    """With several processes each host picks its own sequence bucket; a global array needs one. Pad
    every host's groups to the longest bucket any host chose this step (a tiny collective)."""
    if jax.process_count() == 1:
        return host_batch
    from jax.experimental import multihost_utils

    groups = sorted(host_batch)
    mine = np.array([host_batch[g]["input_ids"].shape[-1] for g in groups], np.int32)
    longest = np.max(multihost_utils.process_allgather(mine), axis=0)
    return {g: pad_to_length(host_batch[g], int(n)) for g, n in zip(groups, longest, strict=True)}


def _to_global(batch, shardings):
    """Host-local numpy batch -> global jax arrays (each process contributes its slice)."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, shardings)


def train(
    cfg: RunConfig,
    model_cfg: ModelConfig,
    params: dict,
    data_iter,
    total_steps: int,
    *,
    emb_token_id: int,
    mesh=None,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) training; returns a summary. `stop_after` ends the process early (tests)."""
    mesh = mesh or make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rows, shards = cfg.train.global_batch // cfg.train.micro_batches, mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(
            f"train.global_batch {cfg.train.global_batch} / train.micro_batches {cfg.train.micro_batches} = {rows} "
            f"rows per micro-batch do not divide over the {shards} batch shards (data x fsdp) of the "
            f"{mesh.devices.size}-device mesh {dict(mesh.shape)}"
        )
    opts = model_options(cfg)
    lcfg = project(LoraConfig, cfg.lora)
    full = not cfg.lora.enabled
    scfg = StepConfig(
        tau=cfg.train.tau,
        embedding=cfg.train.embedding,
        emb_token_id=emb_token_id,
        lora_scale=lcfg.scale,
        full_finetune=full,
        lora_dropout=cfg.lora.dropout,
    )
    tx = make_optimizer(cfg.optim, total_steps)
    lr_at = schedule(cfg.optim, total_steps)
    p_sh = tree_shardings(logical_axes(model_cfg), params, mesh)
    params = place(params, p_sh)
    key = jax.random.key(cfg.train.seed)
    if full:
        lora = None
        trainable = split_lm_head(params)[0]
    else:
        l_sh = tree_shardings(
            lora_axes(model_cfg, lcfg),
            jax.eval_shape(lambda: init_lora(model_cfg, lcfg, key, jnp.dtype(cfg.model.param_dtype))),
            mesh,
        )
        lora = jax.jit(lambda k: init_lora(model_cfg, lcfg, k, jnp.dtype(cfg.model.param_dtype)), out_shardings=l_sh)(
            jax.random.fold_in(key, 1)
        )
        trainable = lora
    opt_state = init_optimizer(tx, trainable, mesh)  # moments laid out as the trainable, not replicated
    rep = replicated(mesh)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, opt_state, jax.random.fold_in(key, 2), jnp.zeros((), jnp.int32)
    )
    state = place(state, mesh_or_replicated(state, mesh))
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=cfg.run.keep_checkpoints,
        async_save=cfg.run.async_checkpoint,
        fingerprint=run_fingerprint(cfg, "contrastive"),
        allow_changed=cfg.run.allow_changed,
    )
    start = 0
    if ckpt.steps() and not cfg.run.resume:
        raise CheckpointIncompatible(
            f"{ckpt.directory} holds checkpoints (steps {ckpt.steps()}) and run.resume is false: a new run there "
            "would rotate them away; use another run.dir or move them"
        )
    if ckpt.steps():  # a corrupt newest step falls back; an incompatible or unreadable set stops the run
        start, state, _ = ckpt.restore_latest(abstract_like(state), data_iter)
        print(f"[elva_jax] resumed from step {start} ({ckpt.directory})", flush=True)

    step_fn = jax.jit(
        lambda s, b: train_step(s, b, cfg=model_cfg, opts=opts, scfg=scfg, tx=tx),
        donate_argnums=(0,),
        out_shardings=(state_sh, rep),
    )
    opts_u = unrolled(opts, model_cfg)  # FLOPs are counted on the unrolled program (XLA counts a scan body once)
    counting_fn = jax.jit(lambda s, b: train_step(s, b, cfg=model_cfg, opts=opts_u, scfg=scfg, tx=tx))
    stop = StopRequest().install()  # run.stop_after_steps: the caller's stop_after, checked below
    logger = MetricsLogger(run_dir)
    prof = Profiler(run_dir, cfg.run.profile_steps)
    peak = device_peak_flops()
    flops = None
    b_sh = None
    summary = {"start_step": start, "losses": [], "compile_s": None}
    t_last = time.perf_counter()
    step = start
    try:
        while step < total_steps:
            try:
                host_batch = next(data_iter)
            except StopIteration:
                break
            host_batch = agree_lengths(host_batch)
            b_sh = b_sh or batch_shardings(host_batch, mesh)
            batch = _to_global(host_batch, b_sh)
            if flops is None:
                t0 = time.perf_counter()
                step_fn.lower(state, batch).compile()
                summary["compile_s"] = time.perf_counter() - t0
                flops = lowered_flops(counting_fn, state, batch)
                logger.log(step, {"compile_s": summary["compile_s"], "flops_per_step": flops})
                print(
                    f"[elva_jax] compiled the train step in {summary['compile_s']:.1f}s"
                    + (f" ({flops / 1e9:.2f} GFLOP/step)" if flops else ""),
                    flush=True,
                )
                t_last = time.perf_counter()
            with prof.step_context(step):
                state, m = step_fn(state, batch)
            step += 1
            loss = float(m["loss"])  # sync point: per-step timing below is wall time of a finished step
            dt = time.perf_counter() - t_last
            t_last = time.perf_counter()
            prof.after_step(step - 1, state.step)
            summary["losses"].append(loss)
            n_ex = int(np.prod(host_batch["query"]["input_ids"].shape[:2])) * jax.process_count()
            n_tok = int(host_batch["query"]["attention_mask"].sum() + host_batch["cand"]["attention_mask"].sum())
            n_tok *= jax.process_count()
            rec = {
                "loss": loss,
                "acc": float(m["acc"]),
                "grad_norm": float(m["grad_norm"]),
                "lr": float(lr_at(step - 1)),
                "step_s": dt,
                "examples_per_s": n_ex / dt,
                "tokens_per_s": n_tok / dt,
                "skipped": int(state.skipped),
                "eta_s": dt * (total_steps - step),
            }
            stats = getattr(data_iter, "stats", None)  # the pipeline's count of records dropped for bad images
            if stats is not None:
                rec["images_skipped"] = int(stats.skipped)
            if flops:
                rec["flops_per_s"] = flops / dt
                if peak:
                    rec["mfu"] = flops / dt / (peak * jax.device_count())
            if step % cfg.run.log_every == 0 or step == total_steps:
                logger.log(step, rec)
                print(
                    f"[elva_jax] step {step}/{total_steps} loss {loss:.4f} acc {rec['acc']:.2f} "
                    f"lr {rec['lr']:.2e} {rec['examples_per_s']:.1f} ex/s eta {rec['eta_s']:.0f}s",
                    flush=True,
                )
            if int(state.skipped) > cfg.train.max_nonfinite:
                raise FloatingPointError(f"{int(state.skipped)} non-finite updates (max {cfg.train.max_nonfinite})")
            if step % cfg.run.checkpoint_every == 0:
                ckpt.save(step, state, data_iter, {"loss": loss, "nonfinite": int(state.skipped)})
            if stop.after_step(0):  # SIGTERM on any host
                ckpt.save(
                    step,
                    state,
                    data_iter,
                    {"loss": loss, "preempted": True, "nonfinite": int(state.skipped)},
                    force=True,
                )
                ckpt.wait()
                print(f"[elva_jax] SIGTERM: saved step {step} and stopping", flush=True)
                summary["preempted"] = True
                break
            if stop_after is not None and step - start >= stop_after:
                break
        if not summary.get("preempted") and step not in ckpt.steps():
            ckpt.save(step, state, data_iter, {"final": True, "nonfinite": int(state.skipped)}, force=True)
    finally:
        ckpt.close()
        logger.close()
        stop.restore()
    summary.update(end_step=step, state=state, skipped=int(state.skipped))
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "state"}, f, indent=2)
    return summary
