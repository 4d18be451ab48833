"""Orbax checkpoints of the whole training state plus the data position, which a resume never destroys.

One checkpoint = {"state": the state pytree (params or LoRA, optimizer state, step, RNG, skip counter),
"data_iter": the data position as JSON (the same on every host, valid for any host count, see
`elva_jax.data.pipeline`), "meta": JSON (the run's fingerprint, metrics, the non-finite count)}.
Saves are asynchronous. What a resume promises:

- Integrity: once a step is written, a manifest of its files (size and CRC-32) is stored beside them
  (`elva_manifest.json`; Orbax 0.12 / TensorStore keep no checksums of their own). A restore verifies
  it first: a flipped byte makes the step corrupt, and the previous step is used.
- Corrupt is not incompatible: a step that reads but does not fit (its tensor shapes or its
  fingerprint, the mesh-independent settings that give a step and a data position their meaning,
  differ from the run's) stops the run with `CheckpointIncompatible`, naming what differs. It is never
  treated as unreadable and never makes the run start over. A fingerprint field may be changed on
  purpose by naming it in ``allow_changed`` (`run.allow_changed`).
- Nothing is started over on top of checkpoints: if none is readable the run stops.
- Rotation keeps the last `keep` steps and, besides them, the newest verified step that no
  non-finite update followed (so a run that went bad keeps its last good state).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib

import jax
import orbax.checkpoint as ocp

from elva_jax.data.errors import DataStateMismatch
from elva_jax.errors import UserError
from elva_jax.runtime.fingerprint import run_fingerprint

log = logging.getLogger(__name__)
MANIFEST = "elva_manifest.json"
GOOD = "elva_followed_by_finite"  # marker: the updates after this step up to the next saved one were finite


class CheckpointNotFound(UserError, FileNotFoundError):
    pass


class CheckpointIncompatible(UserError, ValueError):
    """A readable checkpoint of another configuration (shapes or fingerprint differ)."""


class CheckpointCorrupt(UserError, ValueError):
    """A checkpoint whose files do not match their manifest."""


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_manifest(step_dir: str) -> dict:
    """{relative path: [size, crc32]} of every file under a step directory (the manifest excluded)."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for fn in files:
            full = os.path.join(root, fn)
            rel = os.path.relpath(full, step_dir)
            if rel not in (MANIFEST, GOOD):
                out[rel] = [os.path.getsize(full), _crc(full)]
    return dict(sorted(out.items()))


def fingerprint_diff(saved: dict, current: dict, allow: tuple[str, ...] = ()) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k) and k not in allow]  # fmt: skip


class Checkpointer:
    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        with_data_iter: bool = True,
        fingerprint: dict | None = None,
        allow_changed: tuple[str, ...] = (),
    ):
        self.directory = os.path.abspath(directory)
        self.with_data_iter = with_data_iter
        self.keep = keep
        self.fingerprint = dict(fingerprint or {})
        self.allow_changed = tuple(allow_changed)
        self.primary = jax.process_index() == 0
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if with_data_iter:  # written by the primary process only: the position must not depend on the host
            handlers["data_iter"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            # rotation is ours (see `_rotate`): Orbax's max_to_keep would delete the last good step
            options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True),
            item_handlers=handlers,
        )
        self._pending: set[int] = set()

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, state, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        """Save ``step``; ``meta["nonfinite"]`` (the run's count of skipped updates so far) lets the
        rotation tell a step that a non-finite update followed."""
        self._finish()
        meta = {**(meta or {}), "fingerprint": self.fingerprint}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.with_data_iter:
            items["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._pending.add(step)
        return saved

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _finish(self) -> None:
        """Wait for the saves in flight, write their manifests, then rotate."""
        if not self._pending:
            return
        self.manager.wait_until_finished()
        if self.primary:
            for step in sorted(self._pending):
                d = self._step_dir(step)
                if os.path.isdir(d):
                    with open(os.path.join(d, MANIFEST), "w") as f:
                        json.dump(file_manifest(d), f)
            # a step whose next saved step has the same non-finite count was followed by finite updates
            steps = self.steps()
            for prev, nxt in zip(steps, steps[1:]):
                try:
                    same = self._meta(prev).get("nonfinite", 0) == self._meta(nxt).get("nonfinite", 0)
                except (OSError, ValueError):
                    continue
                if same and nxt in self._pending:
                    open(os.path.join(self._step_dir(prev), GOOD), "w").close()
        self._pending.clear()
        self._rotate()

    def _meta(self, step: int) -> dict:
        with open(os.path.join(self._step_dir(step), "meta", "metadata")) as f:
            return json.load(f)

    def _rotate(self) -> None:
        steps = self.steps()
        if len(steps) <= self.keep or not self.primary:
            return
        keep = set(steps[-self.keep :])
        # the newest step that finite updates followed (its marker is written with its manifest; the files
        # are verified when a restore reads them, not re-read at every save)
        good = [s for s in steps if os.path.exists(os.path.join(self._step_dir(s), GOOD))]
        if good:
            keep.add(good[-1])
        for step in steps:
            if step not in keep:
                shutil.rmtree(self._step_dir(step), ignore_errors=True)
        self.manager.reload()

    def wait(self) -> None:
        self._finish()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # --------------------------------------------------------------------------------------- restore
    def verify(self, step: int) -> str | None:
        """None when the step's files match its manifest (or it predates manifests), else why not."""
        path = os.path.join(self._step_dir(step), MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                want = json.load(f)
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        got = file_manifest(self._step_dir(step))
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        return f"{len(bad)} file(s) differ from the manifest: {bad[:3]}" if bad else None

    def _check_compatible(self, step: int, abstract_state) -> None:
        """Raise CheckpointIncompatible when the saved fingerprint or tensor shapes differ from the run's."""
        saved = self._meta(step).get("fingerprint")
        if saved is not None and self.fingerprint:
            diff = fingerprint_diff(saved, self.fingerprint, self.allow_changed)
            if diff:
                raise CheckpointIncompatible(
                    f"checkpoint step {step} in {self.directory} belongs to another configuration: "
                    + "; ".join(diff)
                    + ". Resume with the checkpoint's values, use another run.dir, or name the fields you mean "
                    "to change in run.allow_changed (nothing was modified)"
                )
        meta = self.manager.item_metadata(step)["state"]
        want = {_name(p): (tuple(x.shape), str(x.dtype)) for p, x in _leaves(abstract_state)}
        keys = {k for k, (_, dt) in want.items() if dt.startswith("key<")}  # PRNG keys are stored as raw data
        got = {_name(p): (tuple(x.shape), str(x.dtype)) for p, x in _leaves(meta) if _name(p) not in keys}
        want = {k: v for k, v in want.items() if k not in keys}
        diff = [f"{k}: checkpoint {got.get(k)}, run {want.get(k)}" for k in sorted(set(want) | set(got))
                if got.get(k) != want.get(k)]  # fmt: skip
        if diff:
            raise CheckpointIncompatible(
                f"checkpoint step {step} in {self.directory} does not fit this run ({len(diff)} tensor(s) differ: "
                + "; ".join(diff[:4])
                + "). Use the checkpoint's settings or another run.dir (nothing was modified)"
            )

    def restore(self, step: int, abstract_state, data_iter=None):
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if self.with_data_iter:
            items["data_iter"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if self.with_data_iter:
            data_iter.set_state(out["data_iter"])
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state, data_iter=None):
        """(step, state, meta) from the newest readable checkpoint. Raises CheckpointIncompatible (a
        readable step of another configuration: never skipped), CheckpointNotFound (none readable)."""
        steps = self.steps()
        if not steps:
            raise CheckpointNotFound(f"no checkpoints in {self.directory}")
        reasons = []
        for step in reversed(steps):
            why = self.verify(step)
            if why is None:
                try:
                    self._meta(step)
                except (OSError, ValueError) as e:
                    why = f"unreadable metadata ({type(e).__name__})"
            if why is None:
                self._check_compatible(step, abstract_state)
                try:
                    state, meta = self.restore(step, abstract_state, data_iter)
                    return step, state, meta
                except DataStateMismatch:  # readable, but another run's data: never fall back or start over
                    raise
                except Exception as e:  # noqa: BLE001 - a read failure of a fitting step: try the previous one
                    why = f"{type(e).__name__}: {str(e)[:200]}"
            reasons.append(f"step {step}: {why}")
            log.warning("checkpoint step %d in %s is unusable (%s)", step, self.directory, why)
            print(
                f"[elva_jax] checkpoint step {step} is corrupt or unreadable ({why}); trying an earlier step",
                flush=True,
            )
        raise CheckpointNotFound(
            f"no readable checkpoint in {self.directory} ({'; '.join(reasons)}). Not starting over on top of "
            "them: move the directory away (or use another run.dir) to start a new run"
        )

    def close(self) -> None:
        self._finish()
        self.manager.wait_until_finished()
        self.manager.close()


def _name(path) -> str:
    """'lora/q_proj/a' for a pytree path, whether the tree is a NamedTuple, a dict or a list."""
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return "/".join(str(p) for p in parts)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def open_stage_checkpoints(cfg, run_dir: str, kind: str, *, with_data_iter: bool = True) -> Checkpointer:
    """One stage's checkpoints under ``{run_dir}/checkpoints``, fingerprinted as checkpoint kind ``kind``
    (`elva_jax.runtime.fingerprint`) with the run's keep / async / allow_changed settings. With
    ``run.resume`` false, existing checkpoints stop the run (a new run there would rotate them away)."""
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=cfg.run.keep_checkpoints,
        async_save=cfg.run.async_checkpoint,
        with_data_iter=with_data_iter,
        fingerprint=run_fingerprint(cfg, kind),
        allow_changed=cfg.run.allow_changed,
    )
    if ckpt.steps() and not cfg.run.resume:
        raise CheckpointIncompatible(
            f"{ckpt.directory} holds {kind} checkpoints (steps {ckpt.steps()}) and run.resume is false: a new run "
            "there would rotate them away; use another run.dir or move them"
        )
    return ckpt
