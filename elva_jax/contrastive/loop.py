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
from jax.experimental import multihost_utils

from elva_jax.configlib import ConfigError
from elva_jax.contrastive.step import StepConfig, TrainState, batch_shardings, split_lm_head, train_step
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
from elva_jax.runtime.checkpointing import Checkpointer, abstract_like, open_stage_checkpoints
from elva_jax.runtime.models import model_options
from elva_jax.runtime.observe import MetricsLogger, Profiler, device_peak_flops, lowered_flops, unrolled
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.runtime.preemption import StopRequest
from elva_jax.schema import RunConfig, project

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
    groups = sorted(host_batch)
    mine = np.array([host_batch[g]["input_ids"].shape[-1] for g in groups], np.int32)
    longest = np.max(multihost_utils.process_allgather(mine), axis=0)
    return {g: pad_to_length(host_batch[g], int(n)) for g, n in zip(groups, longest, strict=True)}


def _to_global(batch, shardings):
    """Host-local numpy batch -> global jax arrays (each process contributes its slice)."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, shardings)


def _check_batch_divides(cfg: RunConfig, mesh) -> None:
    """A micro-batch's rows (train.global_batch / train.micro_batches) must split evenly over the mesh's
    batch shards (data x fsdp)."""
    rows, shards = cfg.train.global_batch // cfg.train.micro_batches, mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(
            f"train.global_batch {cfg.train.global_batch} / train.micro_batches {cfg.train.micro_batches} = {rows} "
            f"rows per micro-batch do not divide over the {shards} batch shards (data x fsdp) of the "
            f"{mesh.devices.size}-device mesh {dict(mesh.shape)}"
        )


def _step_config(cfg: RunConfig, emb_token_id: int) -> tuple[StepConfig, LoraConfig]:
    """(the step's settings: temperature, embedding convention, LoRA scale and dropout or full fine-tuning;
    the LoRA settings) of a run config."""
    lcfg = project(LoraConfig, cfg.lora)
    scfg = StepConfig(
        tau=cfg.train.tau,
        embedding=cfg.train.embedding,
        emb_token_id=emb_token_id,
        lora_scale=lcfg.scale,
        full_finetune=not cfg.lora.enabled,
        lora_dropout=cfg.lora.dropout,
    )
    return scfg, lcfg


def _initial_state(cfg: RunConfig, model_cfg: ModelConfig, params: dict, mesh, lcfg: LoraConfig, tx) -> TrainState:
    """The state at step 0, placed on the mesh: the params sharded by their logical axes; the LoRA adapters
    (initialised from ``train.seed``) or none for full fine-tuning; the optimizer moments laid out as the
    trainable part (the adapters, or the params without an untied LM head); the dropout RNG."""
    p_sh = tree_shardings(logical_axes(model_cfg), params, mesh)
    params = place(params, p_sh)
    key = jax.random.key(cfg.train.seed)
    if not cfg.lora.enabled:
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
    state = TrainState(
        jnp.zeros((), jnp.int32), params, lora, opt_state, jax.random.fold_in(key, 2), jnp.zeros((), jnp.int32)
    )
    return place(state, mesh_or_replicated(state, mesh))


def _open_checkpoints(cfg: RunConfig, state: TrainState, data_iter) -> tuple[Checkpointer, int, TrainState]:
    """(the run's checkpointer, the step to start at, the state there): the newest checkpoint of the run dir,
    restored with the data iterator, when there is one (``run.resume`` must be on), else step 0 and ``state``."""
    ckpt = open_stage_checkpoints(cfg, cfg.run.dir, "contrastive")
    start = 0
    if ckpt.steps():  # a corrupt newest step falls back; an incompatible or unreadable set stops the run
        start, state, _ = ckpt.restore_latest(abstract_like(state), data_iter)
        print(f"[elva_jax] resumed from step {start} ({ckpt.directory})", flush=True)
    return ckpt, start, state


def _step_fns(model_cfg: ModelConfig, opts: ModelOptions, scfg: StepConfig, tx, out_shardings):
    """(the jitted train step, donating its state, with the state's and replicated metrics' shardings; the
    same step with the layer scans unrolled, whose lowering counts the FLOPs: XLA counts a scan body once)."""
    step_fn = jax.jit(
        lambda s, b: train_step(s, b, cfg=model_cfg, opts=opts, scfg=scfg, tx=tx),
        donate_argnums=(0,),
        out_shardings=out_shardings,
    )
    opts_u = unrolled(opts, model_cfg)
    counting_fn = jax.jit(lambda s, b: train_step(s, b, cfg=model_cfg, opts=opts_u, scfg=scfg, tx=tx))
    return step_fn, counting_fn


def _compile(step_fn, counting_fn, state: TrainState, batch, logger: MetricsLogger, step: int):
    """(seconds to compile the train step, its FLOPs or None when XLA does not count them), logged and printed."""
    t0 = time.perf_counter()
    step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = lowered_flops(counting_fn, state, batch)
    logger.log(step, {"compile_s": compile_s, "flops_per_step": flops})
    print(
        f"[elva_jax] compiled the train step in {compile_s:.1f}s"
        + (f" ({flops / 1e9:.2f} GFLOP/step)" if flops else ""),
        flush=True,
    )
    return compile_s, flops


def _step_record(
    m: dict, loss: float, dt: float, host_batch: dict, lr, state: TrainState, steps_left: int, data_iter, flops, peak
) -> dict:
    """The metrics of a finished step (``dt`` seconds of wall time): loss, in-batch accuracy, gradient norm,
    learning rate, throughput over all processes, skipped updates, ETA; the pipeline's images skipped; with
    a FLOP count, FLOP/s and (with the device's peak) the MFU."""
    n_ex = int(np.prod(host_batch["query"]["input_ids"].shape[:2])) * jax.process_count()
    n_tok = int(host_batch["query"]["attention_mask"].sum() + host_batch["cand"]["attention_mask"].sum())
    n_tok *= jax.process_count()
    rec = {
        "loss": loss,
        "acc": float(m["acc"]),
        "grad_norm": float(m["grad_norm"]),
        "lr": float(lr),
        "step_s": dt,
        "examples_per_s": n_ex / dt,
        "tokens_per_s": n_tok / dt,
        "skipped": int(state.skipped),
        "eta_s": dt * steps_left,
    }
    stats = getattr(data_iter, "stats", None)  # the pipeline's count of records dropped for bad images
    if stats is not None:
        rec["images_skipped"] = int(stats.skipped)
    if flops:
        rec["flops_per_s"] = flops / dt
        if peak:
            rec["mfu"] = flops / dt / (peak * jax.device_count())
    return rec


def _log_step(logger: MetricsLogger, step: int, total_steps: int, rec: dict) -> None:
    logger.log(step, rec)
    print(
        f"[elva_jax] step {step}/{total_steps} loss {rec['loss']:.4f} acc {rec['acc']:.2f} "
        f"lr {rec['lr']:.2e} {rec['examples_per_s']:.1f} ex/s eta {rec['eta_s']:.0f}s",
        flush=True,
    )


def _save_preempted(ckpt: Checkpointer, step: int, state: TrainState, data_iter, loss: float) -> None:
    """SIGTERM: save this step now (whatever ``run.checkpoint_every`` says) and wait for the write."""
    ckpt.save(step, state, data_iter, {"loss": loss, "preempted": True, "nonfinite": int(state.skipped)}, force=True)
    ckpt.wait()
    print(f"[elva_jax] SIGTERM: saved step {step} and stopping", flush=True)


def _write_summary(run_dir: str, summary: dict) -> None:
    """summary.json in the run dir (process 0), without the state."""
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "state"}, f, indent=2)


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
    _check_batch_divides(cfg, mesh)
    opts = model_options(cfg)
    scfg, lcfg = _step_config(cfg, emb_token_id)
    tx = make_optimizer(cfg.optim, total_steps)
    lr_at = schedule(cfg.optim, total_steps)
    state = _initial_state(cfg, model_cfg, params, mesh, lcfg, tx)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    run_dir = cfg.run.dir
    ckpt, start, state = _open_checkpoints(cfg, state, data_iter)
    step_fn, counting_fn = _step_fns(model_cfg, opts, scfg, tx, out_shardings=(state_sh, replicated(mesh)))
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
                summary["compile_s"], flops = _compile(step_fn, counting_fn, state, batch, logger, step)
                t_last = time.perf_counter()
            with prof.step_context(step):
                state, m = step_fn(state, batch)
            step += 1
            loss = float(m["loss"])  # sync point: per-step timing below is wall time of a finished step
            dt = time.perf_counter() - t_last
            t_last = time.perf_counter()
            prof.after_step(step - 1, state.step)
            summary["losses"].append(loss)
            rec = _step_record(
                m, loss, dt, host_batch, lr_at(step - 1), state, total_steps - step, data_iter, flops, peak
            )
            if step % cfg.run.log_every == 0 or step == total_steps:
                _log_step(logger, step, total_steps, rec)
            if int(state.skipped) > cfg.train.max_nonfinite:
                raise FloatingPointError(f"{int(state.skipped)} non-finite updates (max {cfg.train.max_nonfinite})")
            if step % cfg.run.checkpoint_every == 0:
                ckpt.save(step, state, data_iter, {"loss": loss, "nonfinite": int(state.skipped)})
            if stop.after_step(0):  # SIGTERM on any host
                _save_preempted(ckpt, step, state, data_iter, loss)
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
    _write_summary(run_dir, summary)
    return summary
