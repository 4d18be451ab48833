"""Orbax checkpoints of the whole training state plus the Grain iterator, with corrupt-step fallback.

One checkpoint = {"state": the TrainState pytree (params or LoRA only, optimizer state, step, RNG,
skip counter), "data_iter": the data iterator's position as JSON (``get_state()``; the training
pipeline's position is the same on every host and valid for any host count, see
`elva_jax.data.pipeline`), "meta": JSON (config hash, metrics)}.
Saves are asynchronous; the last `keep` steps are kept. `restore_latest` restores into the
shardings of the abstract target (any mesh), and when the newest step cannot be read (truncated by a
preemption, corrupt) it reports that and falls back to the previous one.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from elva_jax.data.pipeline import DataStateMismatch
from elva_jax.errors import UserError

log = logging.getLogger(__name__)


class CheckpointNotFound(UserError, FileNotFoundError):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, with_data_iter: bool = True):
        self.directory = os.path.abspath(directory)
        self.with_data_iter = with_data_iter
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if with_data_iter:  # written by the primary process only: the position must not depend on the host
            handlers["data_iter"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_handlers=handlers,
        )

    def save(self, step: int, state, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if self.with_data_iter:
            items["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, abstract_state, data_iter=None):
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if self.with_data_iter:
            items["data_iter"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if self.with_data_iter:
            data_iter.set_state(out["data_iter"])
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state, data_iter=None):
        """(step, state, meta) from the newest readable checkpoint; raises CheckpointNotFound if none."""
        steps = self.steps()
        if not steps:
            raise CheckpointNotFound(f"no checkpoints in {self.directory}")
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state, data_iter)
                return step, state, meta
            except DataStateMismatch:  # readable, but another run's data: never fall back or start over
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means: try the previous step
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e)[:300],
                )
                print(
                    f"[elva_jax] checkpoint step {step} is unreadable ({type(e).__name__}); "
                    f"falling back to an earlier step",
                    flush=True,
                )
        raise CheckpointNotFound(f"no readable checkpoint in {self.directory} (tried steps {steps})")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
