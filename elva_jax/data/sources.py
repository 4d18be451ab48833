"""Data sources: a data root (``data.source``) opened as tables of M-BEIR / MRBench / NLI rows
(:mod:`elva_jax.data.tables`, row layouts in :mod:`elva_jax.data.rows`), read by index into the
pipeline's records (:mod:`elva_jax.data.records`).

A :class:`DataSource` opens a data root (``data.source``):

- ``"files"``: today's layout (M-BEIR jsonl + image files, NLI csv), parsed by :mod:`mbeir` / :mod:`nli`.
- ``"hf"``: a directory written by ``python -m elva_jax.data.prepare --format hf``: one
  ``datasets.Dataset.save_to_disk`` directory per table (Arrow, memory-mapped, random access).
- ``"array_record"``: ``--format array_record``: msgpack rows in ArrayRecord shards, read with Grain's
  ``ArrayRecordDataSource`` (random access).

Both prepared formats share ``manifest.json`` (``{"format", "backend", "tables": {name: {"kind",
"rows", "files", "columns"}}}``; a table is named by the relative path of the file it came from, e.g.
``query/train/x.jsonl``) and copy the small text files (instructions, qrels) as they are. A remote
prepared root (``gs://...``) is staged file by file into a local cache directory through epath first
(:func:`elva_jax.data.tables.stage`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from elva_jax.data.benchmarks import mbeir, nli
from elva_jax.data.errors import SourceError
from elva_jax.data.rows import pool_row, query_row
from elva_jax.data.tables import ArrayRecordTable, HFTable, ListTable, is_remote, stage

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "SOURCES", "DataSource", "open_source"]

SOURCES = ("files", "hf", "array_record")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "elva_jax.prepared/1"


class DataSource:
    """A data root opened with one of SOURCES. ``queries(name)`` / ``pool(name)`` / ``nli(name)`` give
    tables (names are paths relative to the root, as in ``data.train_files``), ``instructions(name)``
    the parsed instruction table or None when the file is absent, ``image_root`` the path image labels
    are resolved against (a prepared root: the directory it was prepared from)."""

    def __init__(self, root: str, kind: str = "files", *, cache_dir: str | None = None):
        if kind not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {kind!r}")
        self.kind, self.root = kind, str(root)
        self.manifest: dict[str, Any] | None = None
        self._local = self.root
        self.image_root = self.root  # image labels (messages, caches) name the original files
        if kind != "files":
            mpath = epath.Path(self.root) / MANIFEST
            if not mpath.exists():
                raise SourceError(
                    f"{mpath}: no manifest; data.source={kind!r} reads a directory written by "
                    f"`python -m elva_jax.data.prepare --format {kind}`"
                )
            self.manifest = json.loads(mpath.read_text())
            if self.manifest.get("format") != MANIFEST_FORMAT or self.manifest.get("backend") != kind:
                raise SourceError(
                    f"{mpath}: written as {self.manifest.get('backend')!r} ({self.manifest.get('format')}), "
                    f"not as data.source={kind!r}"
                )
            self.image_root = self.manifest.get("source_root") or self.root
            if is_remote(self.root):
                self._local = self._stage(cache_dir)

    def _stage(self, cache_dir: str | None) -> str:
        files = [MANIFEST]
        for t in self.manifest["tables"].values():
            files += t["files"] + ([t["columns"]] if t.get("columns") else [])
        files += self.manifest.get("text_files", [])
        return stage(self.root, files, cache_dir)

    def _table(self, name: str, kind: str):
        assert self.manifest is not None
        entry = self.manifest["tables"].get(name)
        if entry is None:
            raise SourceError(
                f"{self.root}: no table {name!r} in {MANIFEST} (tables: {sorted(self.manifest['tables'])})"
            )
        if entry["kind"] != kind:
            raise SourceError(f"{self.root}: table {name!r} holds {entry['kind']} rows, not {kind}")
        files = [os.path.join(self._local, f) for f in entry["files"]]
        if self.kind == "hf":
            return HFTable(files[0])
        columns = {}
        if entry.get("columns"):
            with open(os.path.join(self._local, entry["columns"])) as f:
                columns = json.load(f)
        return ArrayRecordTable(files, columns)

    def queries(self, name: str):
        if self.kind == "files":
            path = epath.Path(self.root) / name
            return ListTable([query_row(q) for q in mbeir.read_queries(path)], path)
        return self._table(name, "queries")

    def pool(self, name: str):
        if self.kind == "files":
            path = epath.Path(self.root) / name
            return ListTable([pool_row(c) for c in mbeir.read_pool(path).values()], path)
        return self._table(name, "pool")

    def nli(self, name: str | None = None):
        """The NLI table ``name``; None: the files source reads the root itself as the csv, a prepared
        root its only NLI table."""
        if self.kind == "files":
            path = epath.Path(self.root) / name if name else epath.Path(self.root)
            rows = [{"sent0": a, "sent1": b, "hard_neg": c} for a, b, c in nli.read_nli_csv(path)]
            return ListTable(rows, path)
        if name is None:
            names = [n for n, t in self.manifest["tables"].items() if t["kind"] == "nli"]
            if len(names) != 1:
                raise SourceError(f"{self.root}: expected exactly one NLI table, found {names}")
            name = names[0]
        return self._table(name, "nli")

    def text_path(self, name: str):
        """Path of a small text file under the root (staged locally for a remote prepared root)."""
        return epath.Path(self._local) / name

    def instructions(self, name: str) -> dict[str, tuple[str, ...]] | None:
        path = self.text_path(name)
        return mbeir.read_instructions(path) if path.exists() else None


def open_source(root: str, kind: str = "files", *, cache_dir: str | None = None) -> DataSource:
    return DataSource(root, kind, cache_dir=cache_dir)
