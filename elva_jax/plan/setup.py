"""The run a plan describes: config, model sizes, static shapes, and the abstract (sharded, never
allocated) params, LoRA, optimizer state and batches the three programs take."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from elva_jax import configlib
from elva_jax.model.backbone import KVCache
from elva_jax.model.families import family_of, read_model_config
from elva_jax.model.inputs import input_axes
from elva_jax.model.lora import init_lora, lora_axes
from elva_jax.model.params import abstract_params, logical_axes
from elva_jax.model.tiny import preset_config, preset_for_checkpoint_name
from elva_jax.parallel.sharding import MeshError, logical_spec, optimizer_shardings, tree_shardings
from elva_jax.plan.targets import PlanError
from elva_jax.runtime.models import model_options
from elva_jax.runtime.optim import make_optimizer
from elva_jax.schema import RunConfig


def model_config(name: str):
    """ModelConfig for '2b' / '7b' (Qwen2-VL's published sizes), 'qwen3vl_2b' / 'qwen3vl_8b' (Qwen3-VL's,
    also Qwen3-VL-Embedding's) or any preset of `elva_jax.model.tiny` ('tiny', 'small', ...)."""
    return preset_config({"2b": "qwen2vl_2b", "7b": "qwen2vl_7b"}.get(name, name))


def resolve_model(run, name: str = "auto"):
    """(ModelConfig, description): --model, else the checkpoint's config.json, else the size named in
    the checkpoint path (".../Qwen2-VL-7B-Instruct", "runs/qwen2vl_2b_nli/export"), else the random preset."""
    if name != "auto":
        return model_config(name), f"{name} (--model)"
    ckpt = run.model.checkpoint
    if ckpt and os.path.exists(os.path.join(ckpt, "config.json")):
        return read_model_config(ckpt), f"config.json of {ckpt}"
    if ckpt:
        found = preset_for_checkpoint_name(ckpt)
        if found:
            return model_config(found[0]), f"{found[1]} sizes (checkpoint {ckpt} not read)"
        raise PlanError(
            f"cannot tell the model size from checkpoint {ckpt!r}; pass --model 2b|7b|qwen3vl_2b|qwen3vl_8b|tiny|small"
        )
    return model_config(run.model.random_preset), f"random preset {run.model.random_preset!r}"


def resolve_embedder(run, name: str = "auto"):
    """Embed-RL's frozen embedder: (ModelConfig, description), resolved as `resolve_model` from
    ``embed_rl.embedder_checkpoint`` / ``embed_rl.embedder_random_preset`` (as `rl.recipes.embed_rl.load_embedder`)."""
    e = run.embed_rl
    model = dataclasses.replace(run.model, checkpoint=e.embedder_checkpoint, random_preset=e.embedder_random_preset)
    mcfg, desc = resolve_model(dataclasses.replace(run, model=model), name)
    return mcfg, desc.replace("(--model)", "(--embedder-model)")


def is_embed_rl(run) -> bool:
    return "rl" in run.train.stages and run.rl.recipe == "embed_rl"


def load_run(config: str, overrides: list[str] | None = None):
    try:
        return configlib.load(RunConfig, config, list(overrides or []))
    except configlib.ConfigError as e:
        raise PlanError(f"config error: {e}") from None


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of the three programs.

    Contrastive: A micro-batches of b queries (L tokens) and b*(1+k) candidates; images packed one row
    of Lv patches per example (as `elva_jax.train.stages` builds the pipeline) unless text-only.
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
    t, d, r = run.train, run.data, run.rl
    B = batch or t.global_batch
    if B % t.micro_batches:
        raise PlanError(f"global batch {B} is not divisible by train.micro_batches={t.micro_batches}")
    L = seq or max(d.seq_buckets)
    # an RL run pads its prompts to rl.prompt_buckets: the largest bucket is the program that must fit
    P = seq or (max(r.prompt_buckets) if "rl" in t.stages else L)
    G = rl_group or r.group_size
    C = rl_candidates or 1 + r.num_hard_negatives + r.num_random_negatives
    if is_embed_rl(run):  # Embed-RL samples pairs: the query and its positive, no candidate list
        if rl_candidates not in (0, 1):
            raise PlanError(f"--rl-candidates {rl_candidates}: rl.recipe=embed_rl samples pairs (1 positive)")
        C = 1
    S = 1 + C
    # an RL run updates on rl.instances_per_step instances at once; otherwise plan the smallest number of
    # instances whose D = I*S prompts (and so the N = D*G rows) split over the batch shards
    I = rl_instances or (r.instances_per_step if "rl" in t.stages else batch_shards // math.gcd(S, batch_shards))
    b = B // t.micro_batches
    return Shapes(
        A=t.micro_batches,
        b=b,
        n_cand=b * (1 + d.hard_negatives),
        L=L,
        # text-only data (NLI) carries no patch arrays (as `elva_jax.train.stages` builds its pipeline)
        images=not text_only and d.kind != "nli",
        Lv=d.patch_row_len,
        I=I,
        G=G,
        S=S,
        P=P,
        T=r.max_summary_tokens + 1,
        rl_images=not text_only and d.kind != "nli",
    )


# ----------------------------------------------------------------------------------------------------
# abstract inputs with shardings


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def model_inputs(mcfg, rows: int, length: int, images: bool, Lv: int, lead: tuple[int, ...] = ()) -> dict:
    """Abstract `backbone.forward` inputs (`elva_jax.model.inputs` layout) for `rows` x `length` tokens."""
    x = {
        "input_ids": _sds(lead + (rows, length), jnp.int32),
        "attention_mask": _sds(lead + (rows, length), jnp.int32),
        "positions": _sds(lead + (3, rows, length), jnp.int32),
    }
    if images:
        x["patches"] = _sds(lead + (rows, Lv, mcfg.vision.patch_dim), jnp.float32)
        x["vision_segment_ids"] = _sds(lead + (rows, Lv), jnp.int32)
        # the family's per-patch inputs (vision_pos, window ids, position-table taps ...), shapes and
        # dtypes from a one-image probe of its host function
        m = mcfg.vision.spatial_merge_size
        for k, v in family_of(mcfg).patch_inputs(np.array([[1, m, m]]), mcfg).items():
            x[k] = _sds(lead + (rows, Lv, *v.shape[1:]), v.dtype)
    return x


def contrastive_batch(mcfg, shp: Shapes) -> dict:
    return {
        "query": model_inputs(mcfg, shp.b, shp.L, shp.images, shp.Lv, (shp.A,)),
        "cand": model_inputs(mcfg, shp.n_cand, shp.L, shp.images, shp.Lv, (shp.A,)),
    }


def rl_batch(mcfg, shp: Shapes, logp_key: str = "old_logp") -> dict:
    """The batch `rl_loss` takes (see `elva_jax.rl.trainer.RLTrainer.step`); ``logp_key``: "old_logp"
    (recomputed, mu > 1 or rl.old_logp=recompute) or "sampler_logp" (the on-policy default's rows)."""
    N, T = shp.N, shp.T
    return {
        "prompts": model_inputs(mcfg, shp.D, shp.P, shp.rl_images, shp.Lv),
        "gen_tokens": _sds((N, T), jnp.int32),
        "gen_lengths": _sds((N,), jnp.int32),
        "mask": _sds((N, T), jnp.bool_),
        logp_key: _sds((N, T), jnp.float32),
        "ref_logp": _sds((N, T), jnp.float32),
        "adv": _sds((N,), jnp.float32),
        "valid": _sds((shp.I, shp.S - 1), jnp.bool_),
    }


def rl_batch_shardings(batch: dict, mesh) -> dict:
    """Rows of every per-sequence array over the batch axes; `valid` [I, C] replicated."""
    rows = lambda v: NamedSharding(mesh, logical_spec(("batch",) + (None,) * (len(v.shape) - 1)))  # noqa: E731
    out = {k: rows(v) for k, v in batch.items() if k != "prompts"}
    out["valid"] = NamedSharding(mesh, PartitionSpec())
    out["prompts"] = {
        k: NamedSharding(mesh, logical_spec(input_axes(k, len(v.shape)))) for k, v in batch["prompts"].items()
    }
    return out


# KV cache (`backbone.KVCache`): rows over the batch axes, KV heads over tensor
CACHE_AXES = dict(
    k=("layers", "batch", None, "kv_heads", None),
    v=("layers", "batch", None, "kv_heads", None),
    valid=("batch", None),
    index=(),
    next_pos=("batch",),
)


def kv_cache(mcfg, rows: int, length: int, dtype=jnp.bfloat16):
    t = mcfg.text
    kv = _sds((t.num_layers, rows, length, t.num_kv_heads, t.head_dim), dtype)
    return KVCache(
        k=kv, v=kv, valid=_sds((rows, length), jnp.bool_), index=_sds((), jnp.int32), next_pos=_sds((rows,), jnp.int32)
    )


def cache_shardings(cache, mesh):
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
    embedder: tuple | None = None  # Embed-RL: (embedder ModelConfig, its abstract sharded params)


def build_setup(run, mcfg, mesh, shapes: Shapes, embedder_mcfg=None) -> Setup:
    """Abstract params / LoRA (sharded by the logical-axis table), and the frozen embedder's params
    when ``embedder_mcfg`` is given; no array is allocated."""
    tx = make_optimizer(run.optim, 1000)
    lcfg = run.lora
    pdt = jnp.dtype(run.model.param_dtype)
    p_abs = abstract_params(mcfg, pdt)
    l_abs = jax.eval_shape(lambda: init_lora(mcfg, lcfg, jax.random.key(0), pdt))
    try:
        params = with_shardings(p_abs, tree_shardings(logical_axes(mcfg), p_abs, mesh))
        lora = with_shardings(l_abs, tree_shardings(lora_axes(mcfg, lcfg), l_abs, mesh))
        embedder = None
        if embedder_mcfg is not None:  # laid out by its own config's logical rules, as `FrozenEmbedder`
            e_abs = abstract_params(embedder_mcfg, pdt)
            embedder = (embedder_mcfg, with_shardings(e_abs, tree_shardings(logical_axes(embedder_mcfg), e_abs, mesh)))
    except MeshError as e:
        raise PlanError(f"{e}") from None
    return Setup(run, mcfg, model_options(run), lcfg, tx, shapes, mesh, params, lora, embedder)


def opt_state(setup: Setup, trainable):
    """Abstract optimizer state with the shardings the training loops give it
    (`elva_jax.parallel.sharding.optimizer_shardings`: moments as the trainable, counters replicated)."""
    out = jax.eval_shape(setup.tx.init, trainable)
    return with_shardings(out, optimizer_shardings(setup.tx, trainable, setup.mesh))
