"""Golden sharding dumps: the PartitionSpec of every parameter, LoRA tensor, batch and KV-cache array.

For a run config on a mesh shape, `sharding_dump` records shape and spec of each tensor exactly as
the run derives them (logical axes -> `LOGICAL_RULES` -> `NamedSharding`), on an `AbstractMesh`, so
no devices are needed for any mesh size. The dumps under `tests/goldens/` are compared with fresh
ones by `tests/plan/test_goldens.py`: a change that moves a tensor off its mesh axis fails there.
After an intended change, rewrite them and review the diff:

    python -m elva_jax.plan --dump-goldens tests/goldens
"""

from __future__ import annotations

import json
import os

import jax
from jax.sharding import AbstractMesh

from elva_jax.contrastive.step import batch_shardings
from elva_jax.parallel.sharding import MESH_AXES
from elva_jax.plan import setup as plan

GOLDEN_CONFIGS = (
    "tiny_cpu",
    "tiny_qwen2_5_vl",
    "tiny_qwen3_vl",
    "qwen2vl_2b_nli",
    "qwen2vl_2b_mbeir",
    "qwen2vl_7b_nli",
    "qwen2vl_7b_mbeir",
    "qwen3vl_2b_mbeir",
)
GOLDEN_MESHES = ((2, 4, 1), (1, 8, 2))  # (data, fsdp, tensor): 8 and 16 devices


def configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def golden_name(config: str, mesh_shape: tuple[int, int, int]) -> str:
    d, f, t = mesh_shape
    return f"{config}.data{d}_fsdp{f}_tensor{t}.json"


def _spec(spec, ndim: int) -> list:
    axes = list(spec) + [None] * (ndim - len(spec))
    return [a if a is None or isinstance(a, str) else list(a) for a in axes]


def _key(path) -> str:
    out = []
    for k in path:
        out.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(out)


def _entries(tree) -> dict:
    """{"a/b/c": {"shape": [...], "dtype": ..., "spec": [...]}} for an abstract pytree with shardings."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[_key(path)] = {"shape": list(x.shape), "dtype": str(x.dtype), "spec": _spec(x.sharding.spec, len(x.shape))}
    return out


def sharding_dump(config: str, mesh_shape: tuple[int, int, int], overrides: list[str] | None = None) -> dict:
    """Specs of params, LoRA, the contrastive batch, the RL batch and the KV cache of `config` on a mesh."""
    path = config if config.endswith(".yaml") else os.path.join(configs_dir(), config + ".yaml")
    run = plan.load_run(path, overrides)
    mcfg, model_desc = plan.resolve_model(run)
    mesh = AbstractMesh(tuple(mesh_shape), MESH_AXES)
    d, f, _ = mesh_shape
    shapes = plan.plan_shapes(run, d * f)
    setup = plan.build_setup(run, mcfg, mesh, shapes)
    batch = plan.contrastive_batch(mcfg, shapes)
    rl = plan.rl_batch(mcfg, shapes)
    cache = plan.kv_cache(mcfg, shapes.N, shapes.P + shapes.T)
    return {
        "config": os.path.splitext(os.path.basename(path))[0],
        "mesh": dict(zip(MESH_AXES, mesh_shape)),
        "model": model_desc,
        "params": _entries(setup.params),
        "lora": _entries(setup.lora),
        "batch": _entries(plan.with_shardings(batch, batch_shardings(batch, mesh))),
        "rl_batch": _entries(plan.with_shardings(rl, plan.rl_batch_shardings(rl, mesh))),
        "kv_cache": _entries(plan.with_shardings(cache, plan.cache_shardings(cache, mesh))),
    }


def dump_goldens(out_dir: str, configs=GOLDEN_CONFIGS, meshes=GOLDEN_MESHES) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for c in configs:
        for m in meshes:
            p = os.path.join(out_dir, golden_name(c, m))
            with open(p, "w") as fh:
                json.dump(sharding_dump(c, m), fh, indent=1, sort_keys=True)
                fh.write("\n")
            written.append(p)
    return written


def diff(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two dumps (empty when equal)."""
    out = []
    for group in sorted(set(expected) | set(actual)):
        e, a = expected.get(group), actual.get(group)
        if not isinstance(e, dict) or not isinstance(a, dict) or group == "mesh":
            if e != a:
                out.append(f"{group}: {e!r} -> {a!r}")
            continue
        for name in sorted(set(e) | set(a)):
            if e.get(name) != a.get(name):
                out.append(f"{group}/{name}: {e.get(name)} -> {a.get(name)}")
    return out
