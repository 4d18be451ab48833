"""The optimizer state's layout on a mesh (`parallel.sharding.optimizer_shardings`): Adam's moments split as
the trainable tree they belong to, counters replicated. Built on an abstract 8-device mesh (no devices);
the oracle is the trainable's own shardings, leaf by leaf, and a hand count of the per-device bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from elva_jax.model.params import abstract_params, logical_axes
from elva_jax.model.tiny import preset_config
from elva_jax.parallel.sharding import MESH_AXES, optimizer_shardings, tree_shardings
from elva_jax.runtime.optim import make_optimizer
from elva_jax.schema import OptimConfig


def test_moments_are_split_as_the_trainable():
    mesh = AbstractMesh((1, 4, 2), MESH_AXES)
    cfg = preset_config("tiny")
    p = abstract_params(cfg, jnp.float32)
    sh = tree_shardings(logical_axes(cfg), p, mesh)
    trainable = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), p, sh)
    tx = make_optimizer(OptimConfig(clip_norm=1.0), 100)  # clip + AdamW with a schedule, as the runs build it
    out = optimizer_shardings(tx, trainable, mesh)
    adam = out[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    flat_p = jax.tree.leaves(sh)
    for moments in (adam.mu, adam.nu):
        assert jax.tree.leaves(moments) == flat_p
    assert adam.count == NamedSharding(mesh, PartitionSpec())
    # the embedding table [vocab, embed] is split 2 x 4 ways: an eighth of it per device, in each moment
    emb = adam.mu["text"]["embed_tokens"]["embedding"]
    assert emb.shard_shape(p["text"]["embed_tokens"]["embedding"].shape) == (151936 // 2, 64 // 4)
