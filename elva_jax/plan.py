"""Pod-scale plans proven by ahead-of-time compilation: does a run fit a topology, and how fast could it go?

    python -m elva_jax.plan --config configs/qwen2vl_7b_mbeir.yaml --topology v5p:2x2x2 \\
        [--mesh data=1,fsdp=8,tensor=1] [--batch N] [--seq L] [--json out.json] [key.sub=value ...]
    python -m elva_jax.plan --dump-goldens tests/goldens      # rewrite the golden sharding dumps

Topologies: "cpu:N" (N fake CPU devices), "local" (this machine's devices, e.g. a GPU), or a TPU slice
("v5e:2x2", "v5p:2x2x2", "v5p:4x4x4", "v6e:4x4", ...) described by libtpu on any host: no TPU
needed, but libtpu must be installed (`pip install "jax[tpu]==<jax version>"`, best in its own venv).

For the run config the plan builds abstract params, LoRA, optimizer state and batches carrying the
run's shardings (`jax.ShapeDtypeStruct` + `NamedSharding`: no weights), then AOT-compiles
(`jit(f).trace(...).lower().compile()`) three programs for the topology: the contrastive train step,
the RL update step (value_and_grad of `rl_loss` + optimizer) and the sampler's one-token decode step.
It reports per-device memory (XLA's argument / output / alias / temp sizes) against HBM, FLOPs per
step and an MFU-bound step time = FLOPs / (devices x peak bf16 FLOP/s x assumed MFU).

FLOPs are counted from the jaxpr (every dot_general, loop bodies multiplied by their trip counts,
remat recomputation included); XLA's `cost_analysis()` is shown too, but it counts a `while` body
(our scanned layers) once, so it undercounts a scanned model about layers-fold.

Exit status: 0 all programs fit; 1 a program does not fit (with suggested changes); 3 the mesh
cannot split a tensor or a batch; 4 the topology is not available here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

GIB = 1024**3
EXIT_NOT_FIT, EXIT_MESH, EXIT_TOPOLOGY = 1, 3, 4


class PlanError(RuntimeError):
    """A plan that cannot be built; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_MESH):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------
# chips and topologies


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # per chip
    peak_flops: float | None  # dense bf16 FLOP/s per chip
    hbm_bw: float | None = None  # HBM bytes/s per chip


CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32, 918e12, 1640e9),
    "h100": Chip("NVIDIA H100", 80, 989e12, 3350e9),
    "h200": Chip("NVIDIA H200", 141, 989e12, 4800e9),
    "cpu": Chip("CPU (pretend HBM)", 16, None),
}
# device_kind substring -> chip (for --topology local)
_KINDS = (
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v4", "v4"),
    ("h100", "h100"),
    ("h200", "h200"),
)


@dataclasses.dataclass
class Target:
    topology: str
    devices: list
    chip: Chip
    n_chips: int

    @property
    def hbm_per_device(self) -> float:
        """Bytes of HBM one device (one JAX device: a chip, or a core of a 2-core v4 chip) may use."""
        return self.chip.hbm_gib * GIB * self.n_chips / len(self.devices)

    @property
    def peak_per_device(self) -> float | None:
        p = self.chip.peak_flops
        return p * self.n_chips / len(self.devices) if p else None

    @property
    def bw_per_device(self) -> float | None:
        b = self.chip.hbm_bw
        return b * self.n_chips / len(self.devices) if b else None

    def describe(self) -> str:
        n = len(self.devices)
        per = f"{self.hbm_per_device / GIB:g} GiB HBM each"
        return f"{self.topology}: {n} device(s) on {self.n_chips} x {self.chip.name}, {per}"


def cpu_devices(n: int) -> list:
    """N fake CPU devices; only possible before JAX's backends start (a fresh process)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up: use what it has
    devs = jax.devices("cpu")
    if len(devs) < n:
        raise PlanError(
            f"topology cpu:{n} needs {n} fake CPU devices, but JAX's CPU backend already started with "
            f"{len(devs)}; run the plan in a fresh process (python -m elva_jax.plan ...)",
            EXIT_TOPOLOGY,
        )
    return devs[:n]


def tpu_devices(topology: str) -> list:
    """Devices of a TPU slice described by libtpu (works on a host without TPUs)."""
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown name
        raise PlanError(
            f"cannot describe TPU topology {topology!r} here ({type(e).__name__}: {e}). AOT compilation for TPUs "
            f'needs libtpu: pip install "jax[tpu]=={jax.__version__}" (best in a separate venv), or plan on fake '
            f"CPU devices with --topology cpu:N",
            EXIT_TOPOLOGY,
        ) from None
    return list(desc.devices)


def resolve_target(topology: str, *, hbm_gib: float | None = None, peak_tflops: float | None = None) -> Target:
    """'cpu:N' | 'local' | '<tpu generation>:<AxB[xC]>' -> devices and chip facts (overridable)."""
    kind, _, shape = topology.lower().partition(":")
    if kind == "cpu":
        n = int(shape or 1)
        devices, chip, chips = cpu_devices(n), CHIPS["cpu"], n
    elif kind == "local":
        devices = jax.devices()
        dk = devices[0].device_kind.lower()
        key = next((c for s, c in _KINDS if s in dk), "cpu" if devices[0].platform == "cpu" else None)
        chip = CHIPS[key] if key else Chip(devices[0].device_kind, 0, None)
        chips = len(devices)
    elif kind in CHIPS and kind not in ("cpu", "h100", "h200"):
        if not re.fullmatch(r"\d+(x\d+)+", shape):
            raise PlanError(f"TPU topology {topology!r} must look like {kind}:2x2 or {kind}:2x2x2", EXIT_TOPOLOGY)
        devices, chip = tpu_devices(f"{kind}:{shape}"), CHIPS[kind]
        chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
    else:
        raise PlanError(
            f"unknown topology {topology!r}: use cpu:N, local, or a TPU slice such as v5e:2x2, v5p:2x2x2, "
            f"v5p:4x4x4, v6e:4x4",
            EXIT_TOPOLOGY,
        )
    if hbm_gib is not None:
        chip = dataclasses.replace(chip, hbm_gib=hbm_gib * len(devices) / chips)
    if peak_tflops is not None:
        chip = dataclasses.replace(chip, peak_flops=peak_tflops * 1e12)
    if not chip.hbm_gib:
        raise PlanError(f"unknown HBM size for {chip.name}; pass --hbm-gib", EXIT_TOPOLOGY)
    return Target(topology, devices, chip, chips)


# ----------------------------------------------------------------------------------------------------
# the run: config, model sizes, shapes


def model_config(name: str):
    """Qwen2VLConfig for '2b' / '7b' (Qwen2-VL's published sizes) or a random preset ('tiny', 'small')."""
    from elva_jax.model.tiny import preset_config

    return preset_config({"2b": "qwen2vl_2b", "7b": "qwen2vl_7b"}.get(name, name))


def resolve_model(run, name: str = "auto"):
    """(Qwen2VLConfig, description): --model, else the checkpoint's config.json, else the size named in
    the checkpoint path (".../Qwen2-VL-7B-Instruct", "runs/qwen2vl_2b_nli/export"), else the random preset."""
    from elva_jax.model.config import Qwen2VLConfig

    if name != "auto":
        return model_config(name), f"{name} (--model)"
    ckpt = run.model.checkpoint
    if ckpt and os.path.exists(os.path.join(ckpt, "config.json")):
        return Qwen2VLConfig.from_file(ckpt), f"config.json of {ckpt}"
    if ckpt:
        m = re.search(r"(?<![0-9.])(2|7)b(?![a-z0-9])", ckpt.lower())
        if m:
            return model_config(m.group(1) + "b"), f"Qwen2-VL-{m.group(1)}B sizes (checkpoint {ckpt} not read)"
        raise PlanError(f"cannot tell the model size from checkpoint {ckpt!r}; pass --model 2b|7b|tiny|small")
    return model_config(run.model.random_preset), f"random preset {run.model.random_preset!r}"


def load_run(config: str, overrides: list[str] | None = None):
    from elva_jax import configlib
    from elva_jax.train.config import RunConfig

    try:
        return configlib.load(RunConfig, config, list(overrides or []))
    except configlib.ConfigError as e:
        raise PlanError(f"config error: {e}") from None


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of the three programs.

    Contrastive: A micro-batches of b queries (L tokens) and b*(1+k) candidates; images packed one row
    of Lv patches per example (as `elva_jax.train.run` builds the pipeline) unless text-only.
    RL: I instances x S = 1 + C sequences = D distinct prompts of P tokens, each sampled G times:
    N = D x G rows of T generated slots (prompt-major, as `elva_jax.rl.trainer` lays them out).
    """

    A: int
    b: int
    n_cand: int
    L: int
    images: bool
    Lv: int
    I: int
    G: int
    S: int
    P: int
    T: int
    rl_images: bool

    @property
    def D(self) -> int:
        return self.I * self.S

    @property
    def N(self) -> int:
        return self.D * self.G


def plan_shapes(
    run,
    batch_shards: int,
    *,
    batch: int | None = None,
    seq: int | None = None,
    text_only: bool = False,
    rl_instances: int = 0,
    rl_candidates: int = 0,
    rl_group: int = 0,
) -> Shapes:
    from elva_jax.rl.rollout import RLConfig

    t, d = run.train, run.data
    B = batch or t.global_batch
    if B % t.micro_batches:
        raise PlanError(f"global batch {B} is not divisible by train.micro_batches={t.micro_batches}")
    L = seq or max(d.seq_buckets)
    rc = RLConfig()
    G = rl_group or rc.group_size
    C = rl_candidates or 1 + rc.num_hard_negatives + rc.num_random_negatives
    S = 1 + C
    # smallest number of instances whose D = I*S prompts (and so the N = D*G rows) split over the batch shards
    I = rl_instances or batch_shards // math.gcd(S, batch_shards)
    b = B // t.micro_batches
    return Shapes(
        A=t.micro_batches,
        b=b,
        n_cand=b * (1 + d.hard_negatives),
        L=L,
        images=not text_only,
        Lv=d.patch_row_len,
        I=I,
        G=G,
        S=S,
        P=L,
        T=rc.max_summary_tokens + 1,
        rl_images=not text_only and d.kind != "nli",
    )


# ----------------------------------------------------------------------------------------------------
# abstract inputs with shardings


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def model_inputs(mcfg, rows: int, length: int, images: bool, Lv: int, lead: tuple[int, ...] = ()) -> dict:
    """Abstract `qwen2vl.forward` inputs (`elva_jax.model.inputs` layout) for `rows` x `length` tokens."""
    x = {
        "input_ids": _sds(lead + (rows, length), jnp.int32),
        "attention_mask": _sds(lead + (rows, length), jnp.int32),
        "positions": _sds(lead + (3, rows, length), jnp.int32),
    }
    if images:
        x["patches"] = _sds(lead + (rows, Lv, mcfg.vision.patch_dim), jnp.float32)
        x["vision_segment_ids"] = _sds(lead + (rows, Lv), jnp.int32)
        x["vision_pos"] = _sds(lead + (rows, Lv, 2), jnp.int32)
    return x


def contrastive_batch(mcfg, shp: Shapes) -> dict:
    return {
        "query": model_inputs(mcfg, shp.b, shp.L, shp.images, shp.Lv, (shp.A,)),
        "cand": model_inputs(mcfg, shp.n_cand, shp.L, shp.images, shp.Lv, (shp.A,)),
    }


def rl_batch(mcfg, shp: Shapes) -> dict:
    """The batch `rl_loss` takes (see `elva_jax.rl.trainer.RLTrainer.step`)."""
    N, T = shp.N, shp.T
    return {
        "prompts": model_inputs(mcfg, shp.D, shp.P, shp.rl_images, shp.Lv),
        "gen_tokens": _sds((N, T), jnp.int32),
        "gen_lengths": _sds((N,), jnp.int32),
        "mask": _sds((N, T), jnp.bool_),
        "old_logp": _sds((N, T), jnp.float32),
        "ref_logp": _sds((N, T), jnp.float32),
        "adv": _sds((N,), jnp.float32),
        "valid": _sds((shp.I, shp.S - 1), jnp.bool_),
    }


def rl_batch_shardings(batch: dict, mesh) -> dict:
    """Rows of every per-sequence array over the batch axes; `valid` [I, C] replicated."""
    from elva_jax.parallel.sharding import logical_spec
    from elva_jax.train.step import INPUT_AXES

    rows = lambda v: NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(v.shape) - 1)))  # noqa: E731
    out = {k: rows(v) for k, v in batch.items() if k != "prompts"}
    out["valid"] = NamedSharding(mesh, PartitionSpec())
    out["prompts"] = {k: NamedSharding(mesh, logical_spec(INPUT_AXES[k])) for k in batch["prompts"]}
    return out


# KV cache (`qwen2vl.KVCache`): rows over the batch axes, KV heads over tensor
CACHE_AXES = dict(
    k=("layers", "batch", None, "kv_heads", None),
    v=("layers", "batch", None, "kv_heads", None),
    valid=("batch", None),
    index=(),
    next_pos=("batch",),
)


def kv_cache(mcfg, rows: int, length: int, dtype=jnp.bfloat16):
    from elva_jax.model.qwen2vl import KVCache

    t = mcfg.text
    kv = _sds((t.num_layers, rows, length, t.num_kv_heads, t.head_dim), dtype)
    return KVCache(
        k=kv, v=kv, valid=_sds((rows, length), jnp.bool_), index=_sds((), jnp.int32), next_pos=_sds((rows,), jnp.int32)
    )


def cache_shardings(cache, mesh):
    from elva_jax.model.qwen2vl import KVCache
    from elva_jax.parallel.sharding import tree_shardings

    return tree_shardings(KVCache(**CACHE_AXES), cache, mesh)


def check_split(tree, shardings, what: str) -> None:
    """PlanError naming the array when a sharded dimension does not divide by its mesh axes."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
        spec = tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))
        for dim, (size, ax) in enumerate(zip(x.shape, spec)):
            if ax is None:
                continue
            axes = (ax,) if isinstance(ax, str) else tuple(ax)
            parts = math.prod(s.mesh.shape[a] for a in axes)
            if size % parts:
                name = jax.tree_util.keystr(path)
                raise PlanError(
                    f"{what}{name}: dimension {dim} of size {size} cannot be split {parts} ways over mesh axes "
                    f"{'x'.join(axes)}; choose sizes that are multiples of {parts} (--batch, train.micro_batches, "
                    f"--rl-instances) or a mesh whose {'x'.join(axes)} divides {size}"
                )


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract pytree whose leaves carry shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


@dataclasses.dataclass
class Setup:
    """Everything the three programs share: configs, optimizer and the sharded abstract state."""

    run: object
    mcfg: object
    opts: object
    lcfg: object
    tx: object
    shapes: Shapes
    mesh: object
    params: dict
    lora: dict


def build_setup(run, mcfg, mesh, shapes: Shapes) -> Setup:
    """Abstract params / LoRA (sharded by the logical-axis table); no array is allocated."""
    from elva_jax.model.params import abstract_params, logical_axes
    from elva_jax.parallel.sharding import MeshError, tree_shardings
    from elva_jax.train.loop import model_options
    from elva_jax.train.lora import LoraConfig, init_lora, lora_axes
    from elva_jax.train.optim import make_optimizer

    tx = make_optimizer(run.optim, 1000)
    lcfg = LoraConfig(rank=run.lora.rank, alpha=run.lora.alpha, targets=tuple(run.lora.targets))
    pdt = jnp.dtype(run.model.param_dtype)
    p_abs = abstract_params(mcfg, pdt)
    l_abs = jax.eval_shape(lambda: init_lora(mcfg, lcfg, jax.random.key(0), pdt))
    try:
        params = with_shardings(p_abs, tree_shardings(logical_axes(mcfg), p_abs, mesh))
        lora = with_shardings(l_abs, tree_shardings(lora_axes(mcfg, lcfg), l_abs, mesh))
    except MeshError as e:
        raise PlanError(f"{e}") from None
    return Setup(run, mcfg, model_options(run), lcfg, tx, shapes, mesh, params, lora)


def _opt_state(setup: Setup, trainable):
    """Abstract optimizer state with the shardings the training loop gets (`jit(tx.init)` propagation)."""
    from elva_jax.parallel.sharding import replicated

    out = jax.eval_shape(setup.tx.init, trainable)
    sh = jax.jit(setup.tx.init).lower(trainable).compile().output_shardings
    # leaves that depend on no input (Adam's step count) come back on one device: replicate them
    on_mesh = lambda s: isinstance(s, NamedSharding) and s.mesh == setup.mesh  # noqa: E731
    sh = jax.tree.map(lambda s: s if on_mesh(s) else replicated(setup.mesh), sh)
    return with_shardings(out, sh)


# ----------------------------------------------------------------------------------------------------
# the three programs


@dataclasses.dataclass
class Program:
    name: str
    fn: object  # jitted
    args: tuple
    groups: dict  # label -> abstract pytree (for the per-device byte breakdown)
    note: str = ""


def train_program(setup: Setup) -> Program:
    """The contrastive train step as the loop jits it (donated state, replicated metrics)."""
    from elva_jax.parallel.sharding import replicated
    from elva_jax.train.step import StepConfig, TrainState, batch_shardings, split_lm_head, train_step

    run, mesh, shp = setup.run, setup.mesh, setup.shapes
    full = not run.lora.enabled
    rep = replicated(mesh)
    lora = None if full else setup.lora
    # full fine-tuning optimizes the params without an untied LM head (`split_lm_head`)
    opt = _opt_state(setup, split_lm_head(setup.params)[0] if full else lora)
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


def rl_update_program(setup: Setup) -> Program:
    """value_and_grad of `rl_loss` wrt LoRA + the optimizer update (as `RLTrainer` jits it)."""
    import optax

    from elva_jax.rl.rewards import RewardConfig
    from elva_jax.rl.rollout import RLConfig, rl_loss

    shp, mesh = setup.shapes, setup.mesh
    rcfg = dataclasses.replace(RLConfig(), group_size=shp.G, max_summary_tokens=shp.T - 1)
    opt = _opt_state(setup, setup.lora)
    batch = rl_batch(setup.mcfg, shp)
    b_sh = rl_batch_shardings(batch, mesh)
    check_split(batch, b_sh, "rl_batch")
    batch = with_shardings(batch, b_sh)

    def update(lora, opt_state, params, batch):
        (_, m), g = jax.value_and_grad(rl_loss, has_aux=True)(
            lora,
            params,
            batch,
            cfg=setup.mcfg,
            opts=setup.opts,
            rcfg=rcfg,
            reward_cfg=RewardConfig(),
            lora_scale=setup.lcfg.scale,
            shape=(shp.I, shp.G, shp.S),
        )
        upd, opt_state = setup.tx.update(g, opt_state, lora)
        return optax.apply_updates(lora, upd), opt_state, {**m, "grad_norm": optax.tree.norm(g)}

    fn = jax.jit(update, donate_argnums=(0, 1))
    groups = {"params": setup.params, "lora": setup.lora, "optimizer": opt, "batch": batch}
    note = f"I={shp.I} x S={shp.S} = {shp.D} prompts of P={shp.P} x G={shp.G} = {shp.N} rows of T={shp.T}" + (
        f", {shp.Lv} patches/row" if shp.rl_images else ", text only"
    )
    return Program("rl_update", fn, (setup.lora, opt, setup.params, batch), groups, note)


def decode_program(setup: Setup) -> Program:
    """One iteration of the sampler's decode loop: sample a token from the logits, then `decode_step`."""
    from elva_jax.model import qwen2vl
    from elva_jax.parallel.sharding import logical_spec, replicated
    from elva_jax.rl.rollout import RLConfig
    from elva_jax.rl.sampler import SamplerConfig, sample_token

    shp, mesh, mcfg = setup.shapes, setup.mesh, setup.mcfg
    rc = RLConfig()
    scfg = SamplerConfig(max_new_tokens=shp.T - 1, temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p)
    cache = kv_cache(mcfg, shp.N, shp.P + shp.T, jnp.dtype(scfg.cache_dtype))
    c_sh = cache_shardings(cache, mesh)
    logits = _sds((shp.N, mcfg.text.vocab_size), jnp.float32)
    l_sh = NamedSharding(mesh, logical_spec(("batch", "vocab")))
    check_split((cache, logits), (c_sh, l_sh), "decode")
    cache, logits = with_shardings(cache, c_sh), with_shardings(logits, l_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))

    def step(params, lora, logits, cache, key):
        key, sub = jax.random.split(key)
        tok, lp = sample_token(sub, logits, scfg)
        _, logits, cache = qwen2vl.decode_step(
            params, tok, cache, mcfg, setup.opts, lora=lora, lora_scale=setup.lcfg.scale
        )
        return tok, lp, logits, cache, key

    fn = jax.jit(step, donate_argnums=(2, 3))
    groups = {"params": setup.params, "lora": setup.lora, "kv_cache": cache, "logits": logits}
    note = f"{shp.N} rows, cache {shp.P + shp.T} slots ({scfg.cache_dtype})"
    return Program("decode", fn, (setup.params, setup.lora, logits, cache, key), groups, note)


PROGRAMS = {"train": train_program, "rl_update": rl_update_program, "decode": decode_program}


# ----------------------------------------------------------------------------------------------------
# compile and measure


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 x output size x contraction size for every dot_general, with scan
    bodies multiplied by their length (while bodies counted once, cond: the costliest branch)."""
    from jax.extend import core as jcore

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_c, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_c)
            continue
        subs = []
        for v in eqn.params.values():
            for x in v if isinstance(v, tuple | list) else (v,):
                if isinstance(x, jcore.ClosedJaxpr):
                    subs.append(x.jaxpr)
                elif isinstance(x, jcore.Jaxpr):
                    subs.append(x)
        if not subs:
            continue
        if name == "cond":
            total += max(jaxpr_flops(s) for s in subs)
        else:
            total += (eqn.params["length"] if name == "scan" else 1) * sum(jaxpr_flops(s) for s in subs)
    return total


def _xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f else None


@dataclasses.dataclass
class Result:
    name: str
    note: str
    groups: dict  # label -> per-device bytes of the program's arguments
    hbm: float
    compile_s: float = 0.0
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0  # whole step, all devices (jaxpr count)
    xla_flops_per_device: float | None = None
    step_s: float | None = None  # compute-bound estimate
    read_s: float | None = None  # memory-bound floor: every argument byte read once from HBM
    error: str | None = None  # the compiler's out-of-memory message, or why it was not compiled

    @property
    def total(self) -> int:
        """Peak bytes one device needs: arguments + outputs - donated (aliased) + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.hbm

    @property
    def verdict(self) -> str:
        """'yes', 'tight' (over 90 % of HBM: fragmentation and runtime buffers may not fit) or 'NO'."""
        return "NO" if not self.fits else "tight" if self.total > 0.9 * self.hbm else "yes"


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def compile_program(prog: Program, target: Target, mfu: float) -> Result:
    """Trace (count FLOPs), lower and compile for the target; an out-of-memory compile is a result too."""
    groups = {k: per_device_bytes(v) for k, v in prog.groups.items() if v is not None}
    res = Result(prog.name, prog.note, groups, target.hbm_per_device)
    args_bytes = sum(groups.values())
    if args_bytes > res.hbm:  # the arguments alone overflow: no need to spend minutes compiling
        res.argument, res.error = args_bytes, "not compiled: the arguments alone exceed HBM"
        return res
    t0 = time.perf_counter()
    traced = prog.fn.trace(*prog.args)
    res.flops = jaxpr_flops(traced.jaxpr.jaxpr)
    peak = target.peak_per_device
    res.step_s = res.flops / (len(target.devices) * peak * mfu) if peak else None
    res.read_s = args_bytes / target.bw_per_device if target.bw_per_device else None
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that cannot fit
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        m = _OOM.search(msg)
        res.argument = args_bytes
        if m:
            res.temp = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
        res.error, res.compile_s = msg.strip().splitlines()[-1][:300], time.perf_counter() - t0
        return res
    res.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    size = lambda k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) if ma is not None else 0  # noqa: E731
    res.output, res.alias, res.temp, res.code = size("output"), size("alias"), size("temp"), size("generated_code")
    # XLA leaves inputs the program never reads (the vision tower in decode) out of its argument size;
    # they stay resident on the device all the same
    res.argument = max(size("argument"), args_bytes)
    res.xla_flops_per_device = _xla_flops(compiled)
    return res


# ----------------------------------------------------------------------------------------------------
# suggestions


def _state_bytes_on(setup: Setup, mesh_shape: tuple[int, int, int], full: bool) -> int | None:
    """Per-device bytes of params + trainable + 2 Adam moments on another mesh shape (None: cannot split)."""
    from jax.sharding import AbstractMesh

    from elva_jax.model.params import logical_axes
    from elva_jax.parallel.sharding import MESH_AXES, MeshError, tree_shardings
    from elva_jax.train.lora import lora_axes

    m = AbstractMesh(mesh_shape, MESH_AXES)
    try:
        p = with_shardings(setup.params, tree_shardings(logical_axes(setup.mcfg), setup.params, m))
        lo = with_shardings(setup.lora, tree_shardings(lora_axes(setup.mcfg, setup.lcfg), setup.lora, m))
    except MeshError:
        return None
    pb, lb = per_device_bytes(p), per_device_bytes(lo)
    return 3 * pb if full else pb + 3 * lb


def suggest(res: Result, setup: Setup, target: Target) -> list[str]:
    """Config changes that should bring a program under HBM, with rough estimates (re-plan to confirm)."""
    run, shp = setup.run, setup.shapes
    data, fsdp, tensor = (setup.mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    full = not run.lora.enabled and res.name == "train"
    hbm, out = res.hbm, []
    state_now = _state_bytes_on(setup, (data, fsdp, tensor), full) or 0
    # 1. move data parallelism into fsdp: same per-device batch, params and optimizer split further
    for k in range(2, data + 1):
        if data % k:
            continue
        new = _state_bytes_on(setup, (data // k, fsdp * k, tensor), full)
        if new is None:
            continue
        est = res.total - state_now + new
        if state_now - new < 0.05 * res.total:
            continue  # not worth it: the state is not what overflows
        if est <= hbm or k == data:
            out.append(
                f"mesh.data={data // k} mesh.fsdp={fsdp * k}: params/optimizer split {fsdp * k * tensor} ways "
                f"(state {state_now / GIB:.1f} -> {new / GIB:.1f} GiB/device; est. total {est / GIB:.1f} GiB)"
            )
            break
    if not run.model.remat and res.name != "decode":
        out.append("model.remat=true: recompute each layer in the backward pass (activations ~layers-fold smaller)")
    p = res.groups.get("params", 0)
    if run.lora.enabled and run.model.param_dtype == "float32" and p > 0.1 * res.total:
        out.append(
            f"model.param_dtype=bfloat16: the frozen base needs no fp32 copy with LoRA "
            f"(params {p / GIB:.1f} -> {p / 2 / GIB:.1f} GiB/device)"
        )
    if res.name == "train" and res.temp > 0.2 * hbm:
        per_device = shp.b // (data * fsdp)  # rows of a micro-batch on one device
        ks = [k for k in range(2, per_device + 1) if per_device % k == 0]
        est_k = lambda k: res.total - res.temp * (1 - 1 / k)  # noqa: E731 - temporaries ~ micro-batch size
        k = next((k for k in ks if est_k(k) <= hbm), ks[-1] if ks else None)
        if k:
            t = res.temp / GIB
            out.append(
                f"train.micro_batches={shp.A * k}: micro-batch {shp.b} -> {shp.b // k} rows (exact accumulation; "
                f"temporaries ~{t:.1f} -> ~{t / k:.1f} GiB, est. total {est_k(k) / GIB:.1f} GiB)"
            )
    if res.name in ("rl_update", "decode"):
        out.append(
            f"fewer RL rows per step: --rl-instances / --rl-candidates (now {shp.N} = {shp.I}x{shp.S}x{shp.G}), "
            f"or a shorter prompt (--seq {shp.P})"
        )
        shards = data * fsdp
        if shp.I > 1 and shp.S % shards:
            c = -(-shp.S // shards) * shards - 1
            out.append(
                f"{shp.I} instances is the fewest whose I x S prompts split over data x fsdp = {shards}; with "
                f"--rl-candidates {c} (S = {c + 1}) one instance splits"
            )
    out.append(f"a larger slice: per-device state and batch shrink with more devices (now {len(target.devices)})")
    return out


# ----------------------------------------------------------------------------------------------------
# report


def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_report(results: list[Result], target: Target, mfu: float) -> str:
    hdr = (
        f"{'program':<10} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'total':>7} {'HBM':>6} {'fits':>5} "
        f"{'compile':>8} {'TFLOP/step':>11} {'XLA GFLOP/dev':>13} {'@' + format(mfu, '.0%') + ' MFU':>10} "
        f"{'HBM read':>9}"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        xla = f"{r.xla_flops_per_device / 1e9:.1f}" if r.xla_flops_per_device else "n/a"
        lines.append(
            f"{r.name:<10} {_g(r.argument):>7} {_g(r.output):>7} {_g(r.alias):>7} {_g(r.temp):>7} {_g(r.total):>7} "
            f"{_g(r.hbm):>6} {r.verdict:>5} {r.compile_s:>7.1f}s {r.flops / 1e12:>11.2f} "
            f"{xla:>13} {_dur(r.step_s):>10} {_dur(r.read_s):>9}"
        )
    lines.append(
        "memory: GiB per device from XLA's memory_analysis (total = args + output - alias + temp + code; args "
        "include inputs the program never reads, which stay resident)"
    )
    for r in results:
        parts = ", ".join(f"{k} {_g(v)}" for k, v in r.groups.items())
        lines.append(f"  {r.name}: {r.note}; arguments per device: {parts}")
    peak, bw = target.peak_per_device, target.bw_per_device
    lines.append(
        "time: '@MFU' = jaxpr matmul FLOPs of the whole step (scanned layers x their count, remat recompute "
        f"included) / ({len(target.devices)} devices x "
        + (f"{peak / 1e12:g} TFLOP/s bf16 peak" if peak else "unknown peak: pass --peak-tflops")
        + f" x {mfu:.0%} assumed MFU); 'HBM read' = argument bytes / "
        + (f"{bw / 1e9:g} GB/s" if bw else "unknown bandwidth")
        + " (the floor for memory-bound programs such as decode). XLA's cost_analysis counts a scanned body once."
    )
    return "\n".join(lines)


def plan(
    run,
    target: Target,
    *,
    model: str = "auto",
    batch: int | None = None,
    seq: int | None = None,
    text_only: bool = False,
    rl_instances: int = 0,
    rl_candidates: int = 0,
    rl_group: int = 0,
    programs: tuple[str, ...] = tuple(PROGRAMS),
    mfu: float = 0.4,
    log=print,
) -> dict:
    """Build, compile and measure; returns a JSON-able report (raises PlanError on mesh/shape errors)."""
    from elva_jax.model.params import count_params
    from elva_jax.parallel.sharding import MeshError, make_mesh

    mcfg, model_desc = resolve_model(run, model)
    try:
        mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=target.devices)
    except MeshError as e:
        raise PlanError(f"mesh: {e}") from None
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    shapes = plan_shapes(
        run,
        sizes["data"] * sizes["fsdp"],
        batch=batch,
        seq=seq,
        text_only=text_only,
        rl_instances=rl_instances,
        rl_candidates=rl_candidates,
        rl_group=rl_group,
    )
    setup = build_setup(run, mcfg, mesh, shapes)
    n_params = count_params(setup.params)
    m = run.model
    log(f"target  {target.describe()}")
    log(
        f"model   {model_desc}: {n_params / 1e9:.2f}B params ({m.param_dtype}), compute {m.dtype}, "
        f"remat {'on' if m.remat else 'off'}, "
        + (f"LoRA r{run.lora.rank} on {','.join(run.lora.targets)}" if run.lora.enabled else "full fine-tuning")
    )
    log(f"mesh    data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']}")
    results, failures = [], {}
    for name in programs:
        prog = PROGRAMS[name](setup)
        log(f"compile {name} ({prog.note}) ...")
        res = compile_program(prog, target, mfu)
        if res.error:
            log(f"        {res.error}")
        results.append(res)
        if not res.fits:
            failures[name] = suggest(res, setup, target)
    log("")
    log(format_report(results, target, mfu))
    report = {
        "topology": target.topology,
        "devices": len(target.devices),
        "chips": target.n_chips,
        "chip": target.chip.name,
        "hbm_bytes_per_device": target.hbm_per_device,
        "peak_flops_per_device": target.peak_per_device,
        "assumed_mfu": mfu,
        "model": model_desc,
        "params": n_params,
        "mesh": sizes,
        "shapes": dataclasses.asdict(shapes),
        "programs": {
            r.name: {
                **{k: getattr(r, k) for k in ("note", "compile_s", "argument", "output", "alias", "temp", "code")},
                "total": r.total,
                "fits": r.fits,
                "verdict": r.verdict,
                "flops": r.flops,
                "xla_flops_per_device": r.xla_flops_per_device,
                "est_step_s": r.step_s,
                "hbm_read_s": r.read_s,
                "error": r.error,
                "arguments_per_device": r.groups,
            }
            for r in results
        },
        "fits": not failures,
        "suggestions": failures,
    }
    if failures:
        log("")
        for name, sug in failures.items():
            r = next(x for x in results if x.name == name)
            need = f"needs {_g(r.total)} GiB per device" if r.total else "does not compile"
            log(
                f"DOES NOT FIT: {name} {need}, {target.chip.name} has {_g(r.hbm)} GiB"
                + (f" ({r.error})" if r.error else "")
                + ". Try (then re-plan):"
            )
            for s in sug:
                log(f"  - {s}")
    return report


def _parse_mesh(text: str) -> list[str]:
    out = []
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in ("data", "fsdp", "tensor") or not v.strip().lstrip("-").isdigit():
            raise PlanError(f"--mesh {text!r}: expected data=..,fsdp=..,tensor=.. (integers, one may be -1)")
        out.append(f"mesh.{k.strip()}={int(v)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m elva_jax.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--config", help="run config (configs/*.yaml)")
    ap.add_argument("--topology", help="cpu:N | local | v5e:2x2 | v5p:2x2x2 | v5p:4x4x4 | v6e:4x4 | ...")
    ap.add_argument("--mesh", default="", help="data=..,fsdp=..,tensor=.. (overrides the config's mesh)")
    ap.add_argument("--batch", type=int, help="global batch (default train.global_batch)")
    ap.add_argument("--seq", type=int, help="sequence / prompt length (default max(data.seq_buckets))")
    ap.add_argument("--model", default="auto", help="auto | 2b | 7b | tiny | small")
    ap.add_argument("--programs", default=",".join(PROGRAMS), help="comma list of " + ",".join(PROGRAMS))
    ap.add_argument("--text-only", action="store_true", help="no image patch arrays in the batches")
    ap.add_argument("--rl-instances", type=int, default=0, help="RL instances per step (0: fewest that split)")
    ap.add_argument("--rl-candidates", type=int, default=0, help="candidates per instance (0: 1+50+50)")
    ap.add_argument("--rl-group", type=int, default=0, help="rollouts per instance G (0: RLConfig default 8)")
    ap.add_argument("--hbm-gib", type=float, help="HBM per device to plan against (default: the chip's)")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per device (default: the chip's)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step-time estimate")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--dump-goldens", metavar="DIR", help="write the golden sharding dumps to DIR and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value run-config overrides, e.g. model.remat=false")
    a = ap.parse_args(argv)
    if a.dump_goldens:
        from elva_jax.parallel.goldens import dump_goldens

        for p in dump_goldens(a.dump_goldens):
            print(f"wrote {p}")
        return 0
    if not a.config or not a.topology:
        ap.error("--config and --topology are required (or --dump-goldens DIR)")
    try:
        if a.topology.split(":")[0].lower() != "local":
            # fake CPU devices / a described TPU slice: never start an accelerator backend here, and let
            # several plans load libtpu at once (it only compiles; no chip is claimed)
            jax.config.update("jax_platforms", "cpu")
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        target = resolve_target(a.topology, hbm_gib=a.hbm_gib, peak_tflops=a.peak_tflops)
        run = load_run(a.config, _parse_mesh(a.mesh) + list(a.overrides))
        programs = tuple(p.strip() for p in a.programs.split(",") if p.strip())
        bad = [p for p in programs if p not in PROGRAMS]
        if bad:
            raise PlanError(f"unknown programs {bad}; choose from {list(PROGRAMS)}")
        print(f"plan    {a.config}")
        report = plan(
            run,
            target,
            model=a.model,
            batch=a.batch,
            seq=a.seq,
            text_only=a.text_only,
            rl_instances=a.rl_instances,
            rl_candidates=a.rl_candidates,
            rl_group=a.rl_group,
            programs=programs,
            mfu=a.mfu,
        )
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    report["config"] = a.config
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if not report["fits"]:
        sys.stdout.flush()
        print(f"error: the plan does not fit {a.topology} (see the suggestions above)", file=sys.stderr)
        return EXIT_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
