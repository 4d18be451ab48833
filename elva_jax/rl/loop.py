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
import os
import time
from collections.abc import Sequence

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
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.rollout import RLConfig
from elva_jax.rl.trainer import RLState, RLTrainer
from elva_jax.runtime.checkpointing import Checkpointer, CheckpointIncompatible, abstract_like
from elva_jax.runtime.fingerprint import run_fingerprint
from elva_jax.runtime.observe import MetricsLogger
from elva_jax.runtime.optim import make_optimizer, schedule
from elva_jax.runtime.preemption import StopRequest
from elva_jax.schema import RunConfig, project


def rl_configs(cfg: RunConfig) -> tuple[RLConfig, RewardConfig]:
    """The RL step's and the rewards' configs, read off the run schema's `rl` section."""
    return project(RLConfig, cfg.rl), project(RewardConfig, cfg.rl)


def random_negatives(record: dict, pool_sides, n_random: int, seed: int, position: int) -> list[int]:
    """Indices into ``pool_sides`` of the ``n_random`` random negatives of the record at ``position`` of
    the instance list: a permutation of the pool seeded by ``[seed, position]``, taken in order, skipping
    sides whose (text, image) equal one of the record's own candidates. ``pool_sides`` is any sequence of
    sides (read only at the permutation's first entries)."""
    if n_random <= 0:
        return []
    own = {(c.get("text"), c.get("image")) for c in record["cands"]}
    rng = np.random.default_rng([seed, position])
    picks: list[int] = []
    for j in rng.permutation(len(pool_sides)):
        c = pool_sides[int(j)]
        if (c.get("text"), c.get("image")) not in own:
            picks.append(int(j))
        if len(picks) == n_random:
            break
    return picks


def add_random_negatives(records: list[dict], pool_sides: list[dict], n_random: int, seed: int) -> list[dict]:
    """Append n_random candidates drawn (seeded per record) from the pool, avoiding the record's own."""
    out = []
    for i, r in enumerate(records):
        picks = random_negatives(r, pool_sides, n_random, seed, i)
        out.append({**r, "cands": r["cands"] + [pool_sides[j] for j in picks]})
    return out


class RLInstances(Sequence):
    """RL instances read by index from a data source (``elva_jax.data.sources``), so prepared shards give
    the RL stage the images' bytes without holding them all in memory.

    Instance i is record ``base[selected[i]]`` (a :class:`~elva_jax.data.sources.ContrastiveRecords`:
    query, positive, hard negatives) with extra candidates appended: the pool items ``extra[i]`` (mined
    negatives, pool row indices) when given, else ``n_random`` random negatives drawn exactly as
    :func:`add_random_negatives` draws them for position i. ``pool_items``: the pool's corpus records
    (:class:`~elva_jax.data.sources.CorpusRecords`) by row. Equal, element by element, to the list the
    files-only builder made (image bytes aside)."""

    def __init__(self, base, selected, pool_items, *, extra=None, n_random: int = 0, seed: int = 0):
        self.base, self.selected, self.pool_items = base, list(selected), pool_items
        self.extra, self.n_random, self.seed = extra, n_random, seed
        self.pool_sides = _Items(pool_items)

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"instance {i} of {len(self)}")
        r = self.base[self.selected[i]]
        picks = (
            self.extra[i]
            if self.extra is not None
            else random_negatives(r, self.pool_sides, self.n_random, self.seed, i)
        )
        return {**r, "cands": r["cands"] + [self.pool_sides[j] for j in picks]}


class Subset(Sequence):
    """``base[rows[i]]`` by index (a view: nothing is read until asked for)."""

    def __init__(self, base, rows):
        self.base, self.rows = base, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.base[self.rows[i]]


def split_probe(instances, n_probe: int, seed: int):
    """(training instances, probe instances): ``n_probe`` instances held out of training by a seeded
    choice (the same for every run with this seed and count), both in their original order."""
    if n_probe <= 0:
        return instances, None
    if n_probe >= len(instances):
        raise ValueError(f"rl.probe_instances {n_probe} leaves none of the {len(instances)} RL instances to train on")
    perm = np.random.default_rng([seed, 101]).permutation(len(instances))
    return Subset(instances, sorted(perm[n_probe:])), Subset(instances, sorted(perm[:n_probe]))


class _Items(Sequence):
    """``corpus[i]["item"]`` by index (a pool's sides)."""

    def __init__(self, corpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i):
        return self.corpus[i]["item"]


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def select_instances(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A deterministic `fraction` of the records, at least one per dataset id prefix ("9:..." -> 9)."""
    if fraction >= 1.0:
        return list(records)
    by_ds: dict[str, list[dict]] = {}
    for r in records:
        by_ds.setdefault(str(r["id"]).split(":")[0], []).append(r)
    rng = np.random.default_rng(seed)
    out = []
    for ds in sorted(by_ds):
        rs = by_ds[ds]
        n = max(1, int(round(fraction * len(rs))))
        out += [rs[i] for i in sorted(rng.choice(len(rs), n, replace=False))]
    return out


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
    tokenizer,
    opts,
    *,
    run_dir: str,
    build_trainer=None,
    full_finetune: bool = False,
) -> dict:
    """The RL stage's resumable loop over the LoRA of ``params`` (the policy's base), or with
    ``full_finetune`` over a copy of ``params`` itself (``params`` then stays the frozen reference; the
    checkpoints' "lora" entry holds the trained full tree, and so does the result's "lora").

    ``build_trainer(tx, mesh, lcfg)``: another recipe's step object (`step(state, batch) -> (state,
    metrics)` with ``reward`` and ``skipped_update``, optionally ``log_line(metrics)``), e.g. Embed-RL's
    (`elva_jax.rl.embed_rl_trainer`); None is ELVA's `RLTrainer`. Checkpoints, resume, data order and
    logging are the same for every recipe."""
    r = cfg.rl
    rcfg, reward_cfg = rl_configs(cfg)
    lcfg = project(LoraConfig, cfg.lora)
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
    if build_trainer is not None:
        trainer = build_trainer(tx, mesh, lcfg)
    elif full_finetune:
        raise ValueError("run_rl: full fine-tuning is the Embed-RL reasoner's (build_trainer); ELVA's RL trains a LoRA")
    else:
        trainer = RLTrainer.from_tokenizer(
            mcfg,
            opts,
            rcfg,
            reward_cfg,
            tx,
            tokenizer,
            lora_scale=lcfg.scale,
            prompt_buckets=tuple(r.prompt_buckets),
            patch_row_len=cfg.data.patch_row_len,
            min_pixels=cfg.data.min_pixels,
            max_pixels=cfg.data.max_pixels,
            mesh=mesh,
        )
    state = place_rl_state(
        RLState(0, params, lora, None, jax.random.fold_in(key, 2)), mcfg, lcfg, tx, mesh, full_finetune
    )
    # step s trains on batch s of a seeded endless shuffle: the position is the step itself, so a resume
    # (on any number of hosts, each running the same RL program) needs no data state
    batches = step_batches(len(instances), r.instances_per_step, cfg.train.seed)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=cfg.run.keep_checkpoints,
        async_save=cfg.run.async_checkpoint,
        with_data_iter=False,
        fingerprint=run_fingerprint(cfg, "embed_rl" if r.recipe == "embed_rl" else "rl"),
        allow_changed=cfg.run.allow_changed,
    )
    if ckpt.steps() and not cfg.run.resume:
        raise CheckpointIncompatible(
            f"{ckpt.directory} holds RL checkpoints (steps {ckpt.steps()}) and run.resume is false: a new run "
            "there would rotate them away; use another run.dir or move them"
        )

    if ckpt.steps():
        step0, state = restore_rl_state(ckpt, state)
        print(f"[elva_jax] RL: resumed from step {step0} ({state.skipped} skipped updates so far)", flush=True)
    step_start = state.step
    stop = StopRequest(cfg.run.stop_after_steps).install()
    logger = MetricsLogger(run_dir)
    history, probes = [], []
    probe_key = jax.random.key(cfg.train.seed + 1013)

    def run_probe():
        if probe_set is None:
            return
        t0 = time.perf_counter()
        p = trainer.probe(state, probe_set, probe_key, r.instances_per_step)
        p["probe_s"] = time.perf_counter() - t0
        logger.log(state.step, p)
        probes.append({"step": state.step, **p})
        print(
            f"[elva_jax] RL probe at step {state.step}: {trainer.probe_line(p)} ({len(probe_set)} held-out "
            f"instances x G {r.group_size}, fixed key; {p['probe_s']:.1f}s)",
            flush=True,
        )

    t_start = time.perf_counter()
    try:
        if state.step == 0:  # a resumed run probed its last step before saving it
            run_probe()
        while state.step < n_steps:
            idx = batches[state.step]
            batch = [instances[int(i)] for i in idx]
            # what the step depends on besides the weights: its instances and its sampling key (logged,
            # so a resumed run can be checked against an uninterrupted one without comparing samples)
            inputs_digest = {
                "instances_digest": _digest(json.dumps([str(x.get("id", i)) for x, i in zip(batch, idx)])),
                "key_digest": _digest(np.asarray(jax.random.key_data(state.key)).tobytes()),
            }
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
            line = getattr(trainer, "log_line", None)
            print(
                f"[elva_jax] RL step {state.step}/{n_steps} {line(m)}"
                if line
                else f"[elva_jax] RL step {state.step}/{n_steps} reward {m['reward']:.4f} (margin "
                f"{m['reward_margin']:.3f}, ranking {m['reward_ranking']:.3f}) kl {m['kl_mean']:.4f} "
                f"len {m['summary_len']:.1f} | rollout {m['time_rollout_s']:.2f}s re-forward "
                f"{m['time_reforward_s']:.2f}s reward {m['time_reward_s']:.3f}s update {m['time_update_s']:.2f}s",
                flush=True,
            )
            if state.step % r.probe_every == 0 or state.step == n_steps:
                run_probe()
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
        "probes": probes,
        "wall_s": time.perf_counter() - t_start,
    }
