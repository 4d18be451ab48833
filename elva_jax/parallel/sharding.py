"""Device mesh and the one table from logical axis names to mesh axes.

Mesh axes: ("data", "fsdp", "tensor"). Batches are split over data x fsdp; parameters are split over
fsdp on their "embed"-like axis (ZeRO-3 style; XLA all-gathers them per layer inside the scan) and
over tensor on heads / mlp / vocab. Changing the parallelism is a config edit (mesh sizes, or this
table), never a code edit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from elva_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("lora_rank", None),
    ("vis_embed", "fsdp"),
    ("vis_qkv", "tensor"),
    ("vis_mlp", "tensor"),
    ("patch", None),
    ("merge", "fsdp"),
)


class MeshError(UserError, ValueError):
    """A mesh shape that does not fit the devices, or a tensor the mesh cannot split."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor); one size may be -1 (= whatever the devices leave)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {n} are available")
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - non-TPU/odd topologies: plain row-major order
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_spec(axes: Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(axes), rules)


def _check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, ax) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if ax is None:
            continue
        parts = math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax))
        if size % parts:
            raise MeshError(
                f"{name}: dimension {dim} of size {size} cannot be split {parts} ways over mesh axes {ax}; "
                f"change the mesh or the logical rule for this axis"
            )


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding for every leaf, from a pytree of logical-axis tuples and one of shapes.

    Raises MeshError naming the tensor when a split does not divide its dimension.
    """
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)  # noqa: E731
    paths_axes, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes)
    shapes = treedef.flatten_up_to(shapes_tree)
    out = []
    for (path, axes), shp in zip(paths_axes, shapes):
        shape = getattr(shp, "shape", shp)
        spec = logical_spec(axes, rules)
        _check_divisible(jax.tree_util.keystr(path), shape, spec, mesh)
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_or_replicated(tree, mesh: Mesh):
    """Shardings for ``tree`` (arrays or shardings): each leaf's own NamedSharding when it is on ``mesh``,
    else replicated on it. Leaves that depend on no sharded input (step counters, RNG keys, Adam's count)
    come out of ``jit`` on one device; this puts them on the mesh so a step's inputs keep one layout."""

    def one(x):
        s = getattr(x, "sharding", x)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh)

    return jax.tree.map(one, tree)


def optimizer_shardings(tx, trainable, mesh: Mesh):
    """Shardings of ``tx``'s state for ``trainable`` (arrays or abstract leaves with NamedShardings): every
    copy of the parameter tree in it (Adam's mu and nu) laid out as ``trainable``, the rest (step counts)
    replicated. `jit(tx.init)` does not do this by itself: its outputs depend on no input value, so XLA
    returns the moments replicated (a full copy per device)."""
    import optax

    state = jax.eval_shape(tx.init, trainable)
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    return optax.tree_map_params(tx, lambda _, s: s, state, shardings, transform_non_params=lambda _: replicated(mesh))


def init_optimizer(tx, trainable, mesh: Mesh | None):
    """``tx.init(trainable)`` built on the devices with `optimizer_shardings` (plain ``tx.init`` without a mesh)."""
    if mesh is None:
        return tx.init(trainable)
    return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, trainable, mesh))(trainable)


def fitting_sharding(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding of the logical ``axes``, or replicated when a split does not divide its dimension
    (per-step data whose row count depends on the step's contents: correct either way, sharded when it can)."""
    spec = logical_spec(axes, rules)
    try:
        _check_divisible("", shape, spec, mesh)
    except MeshError:
        return replicated(mesh)
    return NamedSharding(mesh, spec)


def place(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the shardings span several processes.

    Every process must hold the same values (the same seed, the same file). One process: plain
    device_put. Several: each leaf already laid out as asked is kept, others are rebuilt with
    ``jax.make_array_from_callback`` from the host copy (device_put refuses non-addressable devices).
    PRNG key arrays go through their raw key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if getattr(x, "sharding", None) == s:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: a reshard
            return jax.device_put(x, s)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = one(jax.random.key_data(x), NamedSharding(s.mesh, PartitionSpec(*s.spec, None)))
            return jax.random.wrap_key_data(data, impl=impl)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def host_copy(tree):
    """Numpy copy of a pytree of (possibly multi-process) arrays, the whole value on every process.

    Every process must call it (with several processes it is a collective: ``process_allgather``).
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):  # only arrays spread over processes are gathered; host-local ones are copied as they are
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective with several processes): a
    stop request that one host sees must stop all of them at the same step."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))
