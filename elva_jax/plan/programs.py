"""The programs a run compiles, built as the training code jits them: the contrastive train step, the RL
update, one iteration of the sampler's decode loop and, under Embed-RL, the frozen embedder's pass."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from elva_jax.contrastive.step import StepConfig, TrainState, batch_shardings, split_lm_head, train_step
from elva_jax.model import backbone
from elva_jax.model.inputs import input_axes
from elva_jax.model.sampler import SamplerConfig, sample_token
from elva_jax.parallel.sharding import logical_spec, replicated
from elva_jax.plan.setup import (
    Setup,
    _sds,
    cache_shardings,
    check_split,
    contrastive_batch,
    kv_cache,
    model_inputs,
    opt_state,
    rl_batch,
    rl_batch_shardings,
    with_shardings,
)
from elva_jax.plan.targets import PlanError
from elva_jax.rl.embed_rl_trainer import embed_rows
from elva_jax.rl.loop import rl_configs
from elva_jax.rl.trainer import rl_update


@dataclasses.dataclass
class Program:
    name: str
    fn: object  # jitted
    args: tuple
    groups: dict  # label -> abstract pytree (for the per-device byte breakdown)
    note: str = ""


def train_program(setup: Setup) -> Program:
    """The contrastive train step as the loop jits it (donated state, replicated metrics)."""
    run, mesh, shp = setup.run, setup.mesh, setup.shapes
    full = not run.lora.enabled
    rep = replicated(mesh)
    lora = None if full else setup.lora
    # full fine-tuning optimizes the params without an untied LM head (`split_lm_head`)
    opt = opt_state(setup, split_lm_head(setup.params)[0] if full else lora)
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    state = TrainState(
        scalar, setup.params, lora, opt, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), scalar
    )
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if shp.b % shards:
        B = shp.A * shp.b
        ok = [a for a in range(1, B + 1) if B % a == 0 and (B // a) % shards == 0]
        raise PlanError(
            f"the micro-batch of {shp.b} rows (global batch {B} / train.micro_batches={shp.A}) cannot be split over "
            f"data x fsdp = {shards} devices; use train.micro_batches in {ok[:8]} or a global batch that is a "
            f"multiple of {shards * shp.A}"
            if ok
            else f"the global batch {B} cannot be split over data x fsdp = {shards} devices; use a multiple of {shards}"
        )
    batch = contrastive_batch(setup.mcfg, shp)
    b_sh = batch_shardings(batch, mesh)
    check_split(batch, b_sh, "batch")
    batch = with_shardings(batch, b_sh)
    # the <emb> id only selects which row is the embedding: any value compiles the same program
    scfg = StepConfig(
        tau=run.train.tau,
        embedding=run.train.embedding,
        emb_token_id=-1,
        lora_scale=setup.lcfg.scale,
        full_finetune=full,
        lora_dropout=run.lora.dropout,  # as the loop jits it (the masks are part of the program)
    )
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    fn = jax.jit(
        lambda s, b: train_step(s, b, cfg=setup.mcfg, opts=setup.opts, scfg=scfg, tx=setup.tx),
        donate_argnums=(0,),
        out_shardings=(state_sh, rep),
    )
    groups = {"params": setup.params, "lora": lora, "optimizer": opt, "batch": batch}
    note = f"A={shp.A} x b={shp.b} queries + {shp.n_cand} cands, L={shp.L}" + (
        f", {shp.Lv} patches/row" if shp.images else ", text only"
    )
    return Program("train", fn, (state, batch), groups, note)


def _rl_configs(setup: Setup):
    """The run's RL and reward configs (as the RL loop builds them), at the planned G and summary length."""
    rcfg, reward_cfg = rl_configs(setup.run)
    shp = setup.shapes
    return dataclasses.replace(rcfg, group_size=shp.G, max_summary_tokens=shp.T - 1), reward_cfg


def rl_update_program(setup: Setup) -> Program:
    """The RL trainer's update (`elva_jax.rl.trainer.rl_update`: micro-batched value_and_grad of
    `rl_loss` wrt LoRA + the optimizer), on the run's mesh."""
    shp, mesh = setup.shapes, setup.mesh
    rcfg, reward_cfg = _rl_configs(setup)
    full = _full_rl(setup)
    trainable = setup.params if full else setup.lora  # full: the policy's whole tree, params the frozen reference
    opt = opt_state(setup, trainable)
    batch = rl_batch(setup.mcfg, shp, "old_logp" if rcfg.recompute_old_logp() else "sampler_logp")  # as the trainer
    b_sh = rl_batch_shardings(batch, mesh)
    check_split(batch, b_sh, "rl_batch")
    batch = with_shardings(batch, b_sh)

    M = shp.I // rcfg.micro_instances if rcfg.micro_instances else 1

    def update(lora, opt_state, params, batch):
        if M > 1:  # the trainer passes each chunk's inputs stacked; here one patch row per prompt

            def stack(x, ax):
                x = jnp.moveaxis(x, ax, 0)
                return jnp.moveaxis(x.reshape(M, -1, *x.shape[1:]), 1, ax + 1)

            prompts = {k: stack(v, 1 if k == "positions" else 0) for k, v in batch["prompts"].items()}
            batch = {**batch, "prompts": prompts}
        return rl_update(
            lora,
            opt_state,
            params,
            batch,
            shape=(shp.I, shp.G, shp.S),
            tx=setup.tx,
            rcfg=rcfg,
            mesh=mesh,
            cfg=setup.mcfg,
            opts=setup.opts,
            reward_cfg=reward_cfg,
            lora_scale=setup.lcfg.scale,
            full_finetune=full,
        )

    fn = jax.jit(update, donate_argnums=(0, 1))
    trained = {"trainable params": trainable} if full else {"lora": setup.lora}
    groups = {"params": setup.params, **trained, "optimizer": opt, "batch": batch, **_resident_embedder(setup)}
    note = f"I={shp.I} x S={shp.S} = {shp.D} prompts of P={shp.P} x G={shp.G} = {shp.N} rows of T={shp.T}" + (
        f", {shp.Lv} patches/row" if shp.rl_images else ", text only"
    )
    if full:
        note += ", full fine-tuning (params = the frozen reference copy)"
    return Program("rl_update", fn, (trainable, opt, setup.params, batch), groups, note)


def decode_program(setup: Setup) -> Program:
    """One iteration of the sampler's decode loop: sample a token from the logits, then `decode_step`."""
    shp, mesh, mcfg = setup.shapes, setup.mesh, setup.mcfg
    rc, _ = _rl_configs(setup)
    cache_dtype = setup.opts.dtype if rc.cache_dtype == "compute" else rc.cache_dtype  # as `RLTrainer`
    scfg = SamplerConfig(
        max_new_tokens=shp.T - 1,
        temperature=rc.temperature,
        top_k=rc.top_k,
        top_p=rc.top_p,
        cache_dtype=cache_dtype,
        mesh=mesh,
    )
    # the trainer samples rl.micro_instances instances per call (all of them when 0)
    m = rc.micro_instances if rc.micro_instances and shp.I % rc.micro_instances == 0 else shp.I
    rows = shp.N // shp.I * m
    cache = kv_cache(mcfg, rows, shp.P + shp.T, jnp.dtype(scfg.cache_dtype))
    c_sh = cache_shardings(cache, mesh)
    logits = _sds((rows, mcfg.text.vocab_size), jnp.float32)
    l_sh = NamedSharding(mesh, logical_spec(("batch", "vocab")))
    check_split((cache, logits), (c_sh, l_sh), "decode")
    cache, logits = with_shardings(cache, c_sh), with_shardings(logits, l_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))

    full = _full_rl(setup)
    lora = None if full else setup.lora  # full: the policy samples with its own (trained) tree

    def step(params, lora, logits, cache, key):
        key, sub = jax.random.split(key)
        tok, lp = sample_token(sub, logits, scfg)
        _, logits, cache = backbone.decode_step(
            params, tok, cache, mcfg, setup.opts, lora=lora, lora_scale=setup.lcfg.scale
        )
        return tok, lp, logits, cache, key

    fn = jax.jit(step, donate_argnums=(2, 3))
    groups = {"params": setup.params, "lora": lora, "kv_cache": cache, "logits": logits}
    if full:  # the frozen reference copy and the whole tree's optimizer state stay on the devices meanwhile
        groups.update(
            {"reference params (resident)": setup.params, "optimizer (resident)": opt_state(setup, setup.params)}
        )
    groups.update(_resident_embedder(setup))
    note = f"{rows} rows ({m} of {shp.I} instances per sampler call), cache {shp.P + shp.T} slots ({scfg.cache_dtype})"
    return Program("decode", fn, (setup.params, lora, logits, cache, key), groups, note)


def _full_rl(setup: Setup) -> bool:
    """Embed-RL's fully fine-tuned reasoner (lora.enabled false): the update trains the whole tree
    against a frozen copy (`rl.loop`'s ``full_finetune``); ELVA's RL stage always trains a LoRA."""
    return setup.embedder is not None and not setup.run.lora.enabled


def _resident_embedder(setup: Setup) -> dict:
    """Embed-RL: the frozen embedder's params stay on the devices while the reasoner's programs run (not
    an argument of them, so XLA's argument size leaves them out; the plan counts them)."""
    return {} if setup.embedder is None else {"embedder params (resident)": setup.embedder[1]}


def embed_program(setup: Setup) -> Program:
    """Embed-RL's frozen embedder over one step's rollouts (`elva_jax.rl.embed_rl_trainer.embed_rows`, as
    `FrozenEmbedder` jits it): N = I pairs x 2 sides x G rows of max(embed_rl.embedder_seq_buckets)
    tokens (the side + its T-CoT + the summarise request), `embed_rl.embedder_micro_rows` of them per call
    (0: all), rows over the batch axes, output replicated.
    The reasoner's params, LoRA and optimizer state are resident meanwhile."""
    if setup.embedder is None:
        raise PlanError("the embed program is Embed-RL's frozen embedder: plan an rl stage with rl.recipe=embed_rl")
    shp, mesh = setup.shapes, setup.mesh
    ecfg, eparams = setup.embedder
    E = max(setup.run.embed_rl.embedder_seq_buckets)
    R = setup.run.embed_rl.embedder_micro_rows or shp.N  # rows per call, as `FrozenEmbedder.embed`
    x = model_inputs(ecfg, R, E, shp.rl_images, shp.Lv)
    x_sh = {k: NamedSharding(mesh, logical_spec(input_axes(k, len(v.shape)))) for k, v in x.items()}
    check_split(x, x_sh, "embed")
    x = with_shardings(x, x_sh)
    # the <emb> id only selects each row's embedding position: any value compiles the same program
    fn = jax.jit(functools.partial(embed_rows, cfg=ecfg, opts=setup.opts, emb_id=0), out_shardings=replicated(mesh))
    groups = {
        "embedder params": eparams,
        "batch": x,
        "reasoner params (resident)": setup.params,
        **(
            {"reasoner reference (resident)": setup.params, "optimizer (resident)": opt_state(setup, setup.params)}
            if _full_rl(setup)
            else {"reasoner lora (resident)": setup.lora, "optimizer (resident)": opt_state(setup, setup.lora)}
        ),
    }
    per_call = f", {R} per call" if R != shp.N else ""
    note = f"{shp.N} rows = I={shp.I} pairs x 2 sides x G={shp.G} rollouts of E={E} tokens{per_call}" + (
        f", {shp.Lv} patches/row" if shp.rl_images else ", text only"
    )
    return Program("embed", fn, (eparams, x), groups, note)


PROGRAMS = {"train": train_program, "rl_update": rl_update_program, "decode": decode_program, "embed": embed_program}
