"""A run's training data as its config names it: the bundled set (generated on first use), the M-BEIR files
of ``data.train_files`` / ``data.pool_file``, read by index through ``data.source``, and the skip policy's
account of records that could not be built."""

from __future__ import annotations

import os

import jax
from etils import epath
from jax.experimental import multihost_utils

from elva_jax import configlib
from elva_jax.data.benchmarks.multigrain.generator import ensure_generated
from elva_jax.data.errors import SkippedFractionError
from elva_jax.data.records import ContrastiveRecords, NLIRecords
from elva_jax.data.sources import open_source
from elva_jax.data.tables import concat
from elva_jax.runtime.observe import MetricsLogger

BUNDLED_TRAIN = "query/train/mbeir_multigrain_union_train.jsonl"
BUNDLED_POOL = "cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"


def bundled_root(cfg) -> str:
    """The bundled multi-grain set's directory (``data.root`` or {run.dir}/bundled_data), generated there by
    process 0 if absent; every process returns once it is written."""
    root = cfg.data.root or os.path.join(cfg.run.dir, "bundled_data")
    if jax.process_index() == 0:
        d = cfg.data  # a user-named directory: say what happens there (a foreign one is refused)
        ensure_generated(root, n_train=d.bundled_train_scenes, n_test=d.bundled_test_scenes, announce=bool(d.root))
    if jax.process_count() > 1:  # every process meets here; the others then read what process 0 wrote
        multihost_utils.sync_global_devices("elva_jax bundled data")
    return root


def data_root(cfg) -> str:
    """The training data's root: the bundled set's directory for ``data.kind=bundled``, else ``data.root``."""
    return bundled_root(cfg) if cfg.data.kind == "bundled" else cfg.data.root


def training_files(cfg, root: str) -> tuple[tuple[str, ...], str]:
    """(query files, pool file) of an M-BEIR-format root, relative to it; with ``data.source=files`` a
    missing root or file is a config error naming the field and the path (local or gs://)."""
    d = cfg.data
    files = d.train_files or ((BUNDLED_TRAIN,) if d.kind == "bundled" else ())
    pool_file = d.pool_file or (BUNDLED_POOL if d.kind == "bundled" else "")
    if not files or not pool_file:
        raise configlib.ConfigError("data.train_files and data.pool_file are needed for kind=mbeir")
    if d.source == "files":
        for name, rel in [*(("data.train_files", f) for f in files), ("data.pool_file", pool_file)]:
            if not (epath.Path(root) / rel).is_file():
                where = "no such file" if epath.Path(root).is_dir() else "data.root does not exist"
                raise configlib.ConfigError(f"{name}: {epath.Path(root) / rel}: {where} (data.root {root!r})")
    return files, pool_file


def open_run_source(cfg, root: str):
    """The data source of ``root`` (``data.source``), caching remote reads under {run.dir}/source_cache."""
    return open_source(root, cfg.data.source, cache_dir=os.path.join(cfg.run.dir, "source_cache"))


def policy_drops(cfg) -> list[str] | None:
    """Where records that cannot be built go: a list under the skip policy, None (raise) under fail."""
    return [] if cfg.data.image_policy == "skip" else None


def report_drops(cfg, what: str, drops: list[str] | None, n_queries: int, out: list[str] | None) -> None:
    """Announce the records the skip policy left out, stop past ``data.max_skip_fraction``, and hand the
    reasons to ``out`` (the run's count for summary.json and metrics.jsonl)."""
    if not drops:
        return
    frac = len(drops) / max(1, n_queries)
    print(
        f"[elva_jax] {what}: skip policy left out {len(drops)} of {n_queries} queries that make no record "
        f"(first: {drops[0]})",
        flush=True,
    )
    if frac > cfg.data.max_skip_fraction:
        raise SkippedFractionError(
            f"{what}: {len(drops)}/{n_queries} queries make no record (> data.max_skip_fraction "
            f"{cfg.data.max_skip_fraction:.2%}); first: {drops[0]}"
        )
    if out is not None:
        out.extend(drops)


def log_dropped(run_dir: str, key: str, n: int) -> None:
    """One metrics.jsonl line (step 0) with the count of records the skip policy left out, when any."""
    if n:
        logger = MetricsLogger(run_dir)
        logger.log(0, {key: n})
        logger.close()


def build_records(cfg, root: str, dropped: list[str] | None = None):
    """The contrastive stage's records, read by index through the data source (``data.source``): an
    :class:`~elva_jax.data.records.NLIRecords` or :class:`~elva_jax.data.records.ContrastiveRecords`.

    A query that makes no record (no positive, a candidate missing from the pool) stops the run under
    ``data.image_policy=fail``; under ``skip`` it is left out, announced, counted against
    ``data.max_skip_fraction`` and its reason appended to ``dropped``."""
    d = cfg.data
    src = open_run_source(cfg, root)
    if d.kind == "nli":
        return NLIRecords(src.nli(), num_negatives=d.hard_negatives)
    files, pool_file = training_files(cfg, root)
    queries = concat([src.queries(f) for f in files])
    drops = policy_drops(cfg)
    recs = ContrastiveRecords(
        queries,
        src.pool(pool_file),
        src.image_root,
        instructions=src.instructions(d.instructions_file),
        num_negatives=d.hard_negatives,
        dropped=drops,
    )
    report_drops(cfg, "contrastive data", drops, len(queries), dropped)
    return recs
