"""The ELVA RL stage as a resumable run: instances -> RL steps -> checkpoints and logs.

The policy is the stage-2 model plus a fresh LoRA; the reference policy is the same base with LoRA
off. Step s trains on batch s of a seeded endless shuffle of the instances, so the step saved with
the LoRA, optimizer state and RNG is also the data position: a resumed run (on any number of hosts)
continues with the same instances. The base, the LoRA and its optimizer state live on the run's mesh
(`mesh.*`), laid out by the same logical rules as the contrastive stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.model.config import ModelConfig
from elva_jax.model.lora import LoraConfig, init_lora, lora_axes
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import (
    init_optimizer,
    make_mesh,
    place,
    replicated,
    tree_shardings,
)
from elva_jax.rl.instances import split_probe
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState
from elva_jax.runtime.checkpointing import Checkpointer, abstract_like, open_stage_checkpoints
from elva_jax.runtime.observe import MetricsLogger
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.runtime.preemption import StopRequest
from elva_jax.schema import RunConfig, project


def rl_configs(cfg: RunConfig) -> tuple[RLConfig, RewardConfig]:
    """The RL step's and the rewards' configs, read off the run schema's `rl` section."""
    return project(RLConfig, cfg.rl), project(RewardConfig, cfg.rl)


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def step_batches(n_instances: int, instances_per_step: int, seed: int):
    """``batches[s]``: the instance indices of RL step s, batch s of a seeded endless shuffle of
    ``range(n_instances)`` (random access: a resumed run reads its step's batch directly; depends only
    on the count and the seed, not on the data source or the host)."""
    order = grain.MapDataset.source(np.arange(n_instances)).shuffle(seed=seed).repeat(None)
    return order.batch(instances_per_step, drop_remainder=True)


def place_rl_state(
    state: RLState, mcfg: ModelConfig, lcfg: LoraConfig, tx, mesh, full_finetune: bool = False
) -> RLState:
    """Lay the base params and LoRA out on ``mesh`` by the logical rules, build the optimizer state
    there, and replicate the RNG key (every process must hold the same values). ``full_finetune``: the
    trainable ``state.lora`` is a full param tree, laid out as the params."""
    params = place(state.params, tree_shardings(logical_axes(mcfg), state.params, mesh))
    axes = logical_axes(mcfg) if full_finetune else lora_axes(mcfg, lcfg)
    lora = place(state.lora, tree_shardings(axes, state.lora, mesh))
    opt_state = init_optimizer(tx, lora, mesh)  # moments laid out as the trainable; counters replicated
    return RLState(state.step, params, lora, opt_state, place(state.key, replicated(mesh)))


def rl_saveable(st: RLState) -> dict:
    """What an RL checkpoint holds besides its meta: LoRA, optimizer state, step and RNG key (the frozen
    base is the stage-2 model, rebuilt on resume)."""
    return {
        "lora": st.lora,
        "opt_state": st.opt_state,
        "step": np.int32(st.step),
        "key": jax.random.key_data(st.key),
    }


def restore_rl_state(ckpt: Checkpointer, state: RLState) -> tuple[int, RLState]:
    """(saved step, ``state`` continued from the newest readable RL checkpoint). The run's count of
    skipped non-finite updates goes on from the checkpoint's meta, so ``train.max_nonfinite`` bounds
    the whole run, not each invocation."""
    step0, saved, meta = ckpt.restore_latest(abstract_like(rl_saveable(state)))
    restored = RLState(
        int(saved["step"]),
        state.params,
        saved["lora"],
        saved["opt_state"],
        jax.random.wrap_key_data(saved["key"]),
        skipped=int(meta.get("nonfinite", 0)),
    )
    return step0, restored


def run_rl(
    cfg: RunConfig,
    mcfg: ModelConfig,
    params: dict,
    instances: list[dict],
    *,
    run_dir: str,
    build_trainer,
    full_finetune: bool = False,
) -> dict:
    """The RL stage's resumable loop over the LoRA of ``params`` (the policy's base), or with
    ``full_finetune`` over a copy of ``params`` itself (``params`` then stays the frozen reference; the
    checkpoints' "lora" entry holds the trained full tree, and so does the result's "lora").

    ``build_trainer(tx, mesh, lcfg)``: the recipe's step object (`step(state, batch) -> (state, metrics)`
    with ``reward`` and ``skipped_update``, `log_line(metrics)`, `probe(...)` and `probe_line(probe)`): ELVA's
    `RLTrainer` or Embed-RL's (`elva_jax.rl.embed_rl_trainer`). Checkpoints, resume, data order, probes and
    logging are the same for every recipe."""
    r = cfg.rl
    lcfg = cfg.lora
    instances, probe_set = split_probe(instances, r.probe_instances, cfg.train.seed)
    n_steps = r.steps or max(1, len(instances) // r.instances_per_step)
    ocfg = dataclasses.replace(cfg.optim, lr=r.lr)  # the RL stage keeps the optimizer settings, with its own LR
    tx = make_optimizer(ocfg, n_steps)
    lr_at = schedule(ocfg, n_steps)
    key = jax.random.key(cfg.train.seed + 17)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if full_finetune:  # a separate buffer: the update donates the trainable, never the reference
        lora = jax.tree.map(jnp.copy, params)
    else:
        lora = init_lora(mcfg, lcfg, jax.random.fold_in(key, 1), dtype=cfg.model.param_dtype)
    trainer = build_trainer(tx, mesh, lcfg)
    state = place_rl_state(
        RLState(0, params, lora, None, jax.random.fold_in(key, 2)), mcfg, lcfg, tx, mesh, full_finetune
    )
    # step s trains on batch s of a seeded endless shuffle: the position is the step itself, so a resume
    # (on any number of hosts, each running the same RL program) needs no data state
    batches = step_batches(len(instances), r.instances_per_step, cfg.train.seed)
    ckpt = open_stage_checkpoints(cfg, run_dir, "embed_rl" if r.recipe == "embed_rl" else "rl", with_data_iter=False)
    if ckpt.steps():
        step0, state = restore_rl_state(ckpt, state)
        print(f"[elva_jax] RL: resumed from step {step0} ({state.skipped} skipped updates so far)", flush=True)
    step_start = state.step
    stop = StopRequest(cfg.run.stop_after_steps).install()
    logger = MetricsLogger(run_dir)
    history: list[dict] = []
    probe = _Probe(trainer, probe_set, logger, cfg)
    t_start = time.perf_counter()
    try:
        if state.step == 0:  # a resumed run probed its last step before saving it
            probe(state)
        while state.step < n_steps:
            idx = batches[state.step]
            batch = [instances[int(i)] for i in idx]
            inputs_digest = _inputs_digest(batch, idx, state.key)
            state, m = trainer.step(state, batch)
            m.update(inputs_digest)
            if m["skipped_update"]:
                print(f"[elva_jax] RL step {state.step}: non-finite loss/gradient/update, skipped", flush=True)
            if state.skipped > cfg.train.max_nonfinite:
                raise FloatingPointError(
                    f"RL stage: {state.skipped} non-finite updates (train.max_nonfinite {cfg.train.max_nonfinite}); "
                    "the last checkpoint is kept and nothing is exported"
                )
            m["lr"] = float(lr_at(state.step - 1))
            logger.log(state.step, m)
            history.append(m)
            print(f"[elva_jax] RL step {state.step}/{n_steps} {trainer.log_line(m)}", flush=True)
            if state.step % r.probe_every == 0 or state.step == n_steps:
                probe(state)
            stopping = stop.after_step(state.step - step_start)
            if state.step % cfg.run.checkpoint_every == 0 or state.step == n_steps or stopping:
                meta = {"reward": m["reward"], "nonfinite": state.skipped}
                ckpt.save(state.step, rl_saveable(state), None, meta, force=True)
            if stopping:
                print(f"[elva_jax] saved RL step {state.step} and stopping", flush=True)
                break
    finally:
        ckpt.close()
        logger.close()
        stop.restore()
    return {
        "steps": state.step,
        "total": n_steps,
        "stopped": state.step < n_steps,
        "lora": state.lora,
        "lcfg": lcfg,
        "full_finetune": full_finetune,
        "history": history,
        "probes": probe.results,
        "wall_s": time.perf_counter() - t_start,
    }


def _inputs_digest(batch: list[dict], idx, key) -> dict:
    """What a step depends on besides the weights: its instances and its sampling key (logged, so a resumed
    run can be checked against an uninterrupted one without comparing samples)."""
    return {
        "instances_digest": _digest(json.dumps([str(x.get("id", i)) for x, i in zip(batch, idx)])),
        "key_digest": _digest(np.asarray(jax.random.key_data(key)).tobytes()),
    }


class _Probe:
    """Scores the held-out probe set (`split_probe`) with one fixed sampling key, logs and keeps the result."""

    def __init__(self, trainer, probe_set, logger: MetricsLogger, cfg: RunConfig):
        self.trainer, self.probe_set, self.logger = trainer, probe_set, logger
        self.instances_per_step, self.group_size = cfg.rl.instances_per_step, cfg.rl.group_size
        self.key = jax.random.key(cfg.train.seed + 1013)
        self.results: list[dict] = []

    def __call__(self, state) -> None:
        if self.probe_set is None:
            return
        t0 = time.perf_counter()
        p = self.trainer.probe(state, self.probe_set, self.key, self.instances_per_step)
        p["probe_s"] = time.perf_counter() - t0
        self.logger.log(state.step, p)
        self.results.append({"step": state.step, **p})
        print(
            f"[elva_jax] RL probe at step {state.step}: {self.trainer.probe_line(p)} ({len(self.probe_set)} "
            f"held-out instances x G {self.group_size}, fixed key; {p['probe_s']:.1f}s)",
            flush=True,
        )
