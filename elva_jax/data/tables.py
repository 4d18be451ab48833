"""Tables: random-access sequences of row dicts (``len``, ``table[i]``, ``table.where(i)`` naming the file
and row of a message, ``table.column(name)`` for the small id columns), held in memory (the files
source), in an HF ``datasets`` directory or in ArrayRecord shards, on a local disk or behind a ``gs://``
path (``etils.epath``). A remote prepared root is staged file by file into a local cache directory
first: the Arrow memory map and ArrayRecord's C++ reader both need local files.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Sequence

from etils import epath

from elva_jax.data.errors import ShardRecordError, SourceError

__all__ = ["ArrayRecordTable", "ConcatTable", "HFTable", "ListTable", "concat", "is_remote", "open_table", "stage"]


class ListTable:
    """Rows held in memory (the files source): ``where(i)`` names the file and the row."""

    src_is_json = False
    prepared = False

    def __init__(self, rows: list[dict], path: str):
        self.rows, self.path = rows, str(path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def where(self, i: int) -> str:
        return f"{self.path}, row {i}"

    def column(self, name: str) -> list:
        return [r[name] for r in self.rows]


class HFTable:
    """One ``datasets.Dataset`` directory (``load_from_disk``: Arrow files memory-mapped)."""

    src_is_json = True
    prepared = True

    def __init__(self, directory: str, dataset=None):
        import datasets

        self.path = str(directory)
        self.ds = dataset if dataset is not None else datasets.load_from_disk(self.path)

    @classmethod
    def from_parquet(cls, files: Sequence[str], cache_dir: str | None = None) -> HFTable:
        """Parquet file(s) -> one table (``Dataset.from_parquet``: converted once to Arrow, memory-mapped)."""
        import datasets

        ds = datasets.Dataset.from_parquet(list(files), cache_dir=cache_dir)
        return cls(files[0] if len(files) == 1 else os.path.dirname(files[0]), ds)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]

    def where(self, i: int) -> str:
        return f"{self.path}, row {i}"

    def column(self, name: str) -> list:
        return list(self.ds[name])


class ArrayRecordTable:
    """msgpack rows in ArrayRecord shards (Grain's ``ArrayRecordDataSource``); ``where(i)`` names the
    shard and the record's index inside it. ``columns`` holds the small id columns saved beside the shards."""

    src_is_json = True
    prepared = True

    def __init__(self, shards: Sequence[str], columns: dict[str, list]):
        import grain

        self.shards = [str(s) for s in shards]
        self.source = grain.sources.ArrayRecordDataSource(self.shards)
        self._columns = columns
        self._starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        import msgpack

        raw = self.source[int(i)]
        try:
            row = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # msgpack raises several unrelated types for corrupt input
            raise ShardRecordError(self.where(i), f"not a msgpack row ({type(e).__name__}: {e})") from None
        if not isinstance(row, dict):
            raise ShardRecordError(self.where(i), f"expected a msgpack map, got {type(row).__name__}")
        return row

    def where(self, i: int) -> str:
        if self._starts is None:
            from array_record.python.array_record_module import ArrayRecordReader

            starts, n = [], 0
            for s in self.shards:
                starts.append(n)
                reader = ArrayRecordReader(s)
                n += reader.num_records()
                reader.close()
            self._starts = starts
        k = max(j for j, s in enumerate(self._starts) if s <= i)
        return f"{self.shards[k]}, record {i - self._starts[k]}"

    def column(self, name: str) -> list:
        return list(self._columns[name])


class ConcatTable:
    """Tables one after another (several ``data.train_files``): row i of the concatenation."""

    def __init__(self, tables: Sequence):
        self.tables = list(tables)
        self.starts = [0]
        for t in self.tables:
            self.starts.append(self.starts[-1] + len(t))
        self.src_is_json = all(t.src_is_json for t in self.tables)
        self.prepared = all(t.prepared for t in self.tables)
        if len({t.src_is_json for t in self.tables}) > 1:
            raise ValueError("cannot concatenate tables of different sources")

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def __getitem__(self, i: int) -> dict:
        k, j = self._locate(int(i))
        return self.tables[k][j]

    def where(self, i: int) -> str:
        k, j = self._locate(int(i))
        return self.tables[k].where(j)

    def column(self, name: str) -> list:
        return [x for t in self.tables for x in t.column(name)]


def concat(tables: Sequence):
    return tables[0] if len(tables) == 1 else ConcatTable(tables)


def is_remote(path: str) -> bool:
    return "://" in str(path)


def stage(remote_root: str, rel_paths: Sequence[str], cache_dir: str | None = None) -> str:
    """Copy ``rel_paths`` (files, or directories one or two levels deep) under ``remote_root`` (any epath
    URL) into a local cache directory, once (a file of the same size is kept); returns the local root.
    Default cache: ``~/.cache/elva_jax/sources``; one sub-directory per remote root."""
    base = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "elva_jax", "sources")
    local = os.path.join(base, hashlib.sha256(str(remote_root).encode()).hexdigest()[:16])
    remote = epath.Path(remote_root)
    for rel in rel_paths:
        src = remote / rel if rel else remote
        for s in [*src.glob("*"), *src.glob("*/*")] if src.is_dir() else [src]:
            if s.is_dir():
                continue
            dst = os.path.join(local, str(s)[len(str(remote)) + 1 :])
            size = s.stat().length
            if os.path.exists(dst) and os.path.getsize(dst) == size:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + ".part"
            with s.open("rb") as fi, open(tmp, "wb") as fo:
                while chunk := fi.read(1 << 22):
                    fo.write(chunk)
            os.replace(tmp, dst)
    return local


def open_table(path: str, *, cache_dir: str | None = None):
    """Any table by path, for readers of other layouts (e.g. MMEB): an HF ``save_to_disk`` directory
    (``load_from_disk``), a ``.parquet`` file or a directory of them (``Dataset.from_parquet``, converted
    once into Arrow under ``cache_dir`` and memory-mapped), or ``.array_record`` shard(s) / a directory
    of them (msgpack rows). A remote path (``gs://``) is staged into ``cache_dir`` first. Rows are the
    stored columns as they are (no M-BEIR conversion)."""
    p = epath.Path(path)
    if is_remote(path):
        if p.is_dir():
            local_root = stage(path, [""], cache_dir)
        else:
            local_root = os.path.join(stage(str(p.parent), [p.name], cache_dir), p.name)
        path = local_root
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if "state.json" in names:
            return HFTable(path)
        parquet = [os.path.join(path, n) for n in names if n.endswith(".parquet")]
        shards = [os.path.join(path, n) for n in names if n.endswith(".array_record")]
        if parquet:
            return HFTable.from_parquet(parquet, cache_dir)
        if shards:
            return ArrayRecordTable(shards, {})
        raise SourceError(f"{path}: no HF dataset (state.json), .parquet or .array_record files")
    if path.endswith(".parquet"):
        return HFTable.from_parquet([path], cache_dir)
    if path.endswith(".array_record"):
        return ArrayRecordTable([path], {})
    raise SourceError(f"{path}: not an HF dataset directory, a .parquet or an .array_record file")
