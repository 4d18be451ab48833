"""The Grain wiring: :func:`make_pipeline` over a record sequence (shuffle, repeat, encode, per-host slice,
batch, optional ``mp_prefetch``), the resumable :class:`PipelineIterator`, and saving / restoring its
position with Orbax (see the package docstring for the elastic scheme)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain

from elva_jax.data.errors import DataStateMismatch, SkippedFractionError
from elva_jax.data.pipeline.collate import Collate
from elva_jax.data.pipeline.config import PipelineConfig, PipelineStats
from elva_jax.data.pipeline.encode import EncodedWithSubstitutes, EncodeRecord, not_skipped
from elva_jax.model.config import ModelConfig

__all__ = ["PipelineIterator", "make_pipeline", "restore_checkpoint", "save_checkpoint"]

_DEFAULT_CONFIG = PipelineConfig()  # frozen


class PipelineIterator:
    """Iterates batches (without ``_meta``), aggregates PipelineStats and keeps ``last_ids``.

    ``get_state()`` / ``set_state()`` give a JSON-able position. Elastic (training) iterators:
    ``{"global_next_index", "global_batch", "num_records", "seed"}``, the same on every host and valid
    for any host count (restoring checks that the records and seed are the ones it was saved with).
    Corpus iterators: Grain's own per-host state.
    """

    def __init__(self, cfg: PipelineConfig, *, make_iter, elastic: bool, global_batch: int, num_records: int):
        self.cfg = cfg
        self.stats = PipelineStats()
        self.last_ids: list[str] = []  # record ids of the last batch (row order, micro-batch major)
        self._make_iter, self._elastic = make_iter, elastic
        self._global_batch, self._num_records = global_batch, num_records
        self._position = 0  # elastic: global index of the next batch's first record
        self._iter = None

    @property
    def grain_iterator(self):
        if self._iter is None:
            self._iter = iter(self._make_iter(self._position))
        return self._iter

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self.grain_iterator)
        self._position += self._global_batch
        meta = batch.pop("_meta")
        s = self.stats
        s.batches += 1
        s.examples += len(meta["ids"])
        s.seen += len(meta["ids"]) + len(meta["skipped_paths"])
        s.skipped += len(meta["skipped_paths"])
        s.skipped_paths = (s.skipped_paths + meta["skipped_paths"])[-16:]
        if meta["skipped_paths"]:
            print(
                f"[elva_jax] data: skip policy replaced {len(meta['skipped_paths'])} record(s) with a bad image "
                f"({s.skipped} so far): {meta['skipped_paths'][0]}",
                flush=True,
            )
        s.images += meta["images"]
        s.videos += meta["videos"]
        s.truncated += meta["truncated"]
        self.last_ids = meta["ids"]
        pol = self.cfg.image_policy
        if s.seen >= pol.min_seen and s.skipped > pol.max_skip_fraction * s.seen:
            raise SkippedFractionError(
                f"{s.skipped}/{s.seen} records skipped for bad images (> {pol.max_skip_fraction:.2%}); "
                f"last: {s.skipped_paths[-1]}"
            )
        return batch

    def get_state(self) -> dict:
        if not self._elastic:
            return self.grain_iterator.get_state()
        return {
            "global_next_index": self._position,
            "global_batch": self._global_batch,
            "num_records": self._num_records,
            "seed": self.cfg.seed,
        }

    def set_state(self, state: dict) -> None:
        if not self._elastic:
            self.grain_iterator.set_state(state)
            return
        if "global_next_index" not in state:
            raise DataStateMismatch(f"data iterator state {state!r} is not an elastic pipeline state")
        saved = (state.get("num_records"), state.get("seed"))
        if saved != (self._num_records, self.cfg.seed):
            raise DataStateMismatch(
                f"the data iterator was saved over {saved[0]} records with shuffle seed {saved[1]}, but this "
                f"run has {self._num_records} records with seed {self.cfg.seed}: resuming would not continue "
                f"the same order (restore with the same data and data.shuffle_seed, or start a fresh run)"
            )
        if state["global_next_index"] % self._global_batch:
            print(
                f"[elva_jax] data: resuming at record {state['global_next_index']} with a global batch of "
                f"{self._global_batch} (saved with {state.get('global_batch')}): batches now start mid-way",
                flush=True,
            )
        self._position = int(state["global_next_index"])
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None


def make_pipeline(
    records: Sequence[dict],
    encoder,
    model_cfg: ModelConfig,
    cfg: PipelineConfig = _DEFAULT_CONFIG,
    *,
    kind: str = "contrastive",
) -> PipelineIterator:
    """Build the pipeline over ``records`` and return a checkpointable iterator.

    kind: "contrastive" (also NLI and RL records: {"query", "cands"}; the elastic flow) or "corpus"
    ({"item"}). encoder: an object with ``encode(side, pixel_values, image_grid_thw, max_len) -> (row,
    truncated)`` (e.g. :class:`elva_jax.data.encoding.PromptEncoder`). Each record must have exactly
    1 + cfg.num_negatives candidates.
    """
    if kind not in ("contrastive", "corpus"):
        raise ValueError(f"kind must be 'contrastive' or 'corpus', got {kind!r}")
    if kind == "contrastive" and isinstance(records, (list, tuple)):  # record views build 1 + k by construction
        for r in records:
            if len(r["cands"]) != 1 + cfg.num_negatives:
                raise ValueError(
                    f"record {r['id']!r} has {len(r['cands'])} candidates, expected {1 + cfg.num_negatives}"
                )
    pi, pc = cfg.process_index, cfg.process_count
    if pi is None or pc is None:
        import jax

        pi, pc = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(list(records) if not isinstance(records, Sequence) else records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    keys = ("query", "cands") if kind == "contrastive" else ("item",)
    encode = EncodeRecord(encoder, cfg, keys)
    collate = Collate(cfg, model_cfg, kind)
    G = cfg.records_per_batch * pc  # records per global batch

    def finish(it):
        it = it.batch(cfg.records_per_batch, drop_remainder=cfg.drop_remainder, batch_fn=collate)
        if cfg.mp_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.mp_workers))
        return it

    if kind == "corpus":

        def make_iter(_start):
            return finish(ds[pi::pc].to_iter_dataset().map(encode).filter(not_skipped))

        return PipelineIterator(cfg, make_iter=make_iter, elastic=False, global_batch=G, num_records=len(records))

    encoded = EncodedWithSubstitutes(ds, encode, stride=G)

    def make_iter(start: int):
        n = len(encoded)
        part = encoded[start:]
        if n < sys.maxsize and cfg.drop_remainder:  # every host gets the same number of full batches
            part = encoded[start : start + (n - start) // G * G]
        return finish(part[pi::pc].to_iter_dataset())

    return PipelineIterator(cfg, make_iter=make_iter, elastic=True, global_batch=G, num_records=len(records))


def save_checkpoint(directory: str | Path, step: int, iterator: PipelineIterator, **items) -> None:
    """Save the data iterator's position (a JSON item) with any other Orbax items (``items``: name ->
    ``ocp.args.*Save``, e.g. ``state=ocp.args.StandardSave(tree)``) at ``step``."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as mngr:
        args = ocp.args.Composite(data_iter=ocp.args.JsonSave(iterator.get_state()), **items)
        mngr.save(step, args=args)
        mngr.wait_until_finished()


def restore_checkpoint(directory: str | Path, iterator: PipelineIterator, step: int | None = None, **items):
    """Restore ``iterator``'s position in place and the other ``items`` (name -> ``ocp.args.*Restore``)
    from ``step`` (default: latest); returns the Orbax Composite result."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        out = mngr.restore(step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore(), **items))
        iterator.set_state(out["data_iter"])
        return out
