"""The embedding cache on disk: record lists split into parts, each part's file recorded in an index once written.

Layout (``Embedder.embed(records, name=..., cache_dir=...)``, :mod:`elva_jax.eval.embed`)::

    {cache_dir}/{name}/index.json            fingerprint, ids, records hash, finished parts (+ sha256)
    {cache_dir}/{name}/part-00000.npy        float32 [<= part_size, D], records [0, part_size)
    {cache_dir}/{name}/part-00000.summaries.json   ("ret" mode) the generated summaries

The fingerprint holds the checkpoint identity (path, step, weight files), the mode and every prompt /
summary setting. A part is recorded in the index only after its file is written (atomically), so an
interrupted run resumes at the first unfinished part; finished parts are reused. A part the index
lists as finished whose file is missing or corrupt (size, header or sha256) raises :class:`CacheError`
naming the file (``cache="use"``, the default: a finished cache should never lose files silently), or is
reported and recomputed with ``cache="repair"``. An index written for another fingerprint or another
record list also raises :class:`CacheError`. ``cache="none"`` (or no ``cache_dir``) computes everything
and writes nothing. One writer per cache directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from elva_jax.errors import UserError

__all__ = [
    "CACHE_FORMAT",
    "CacheError",
    "PartedArray",
    "fingerprint_sha",
    "new_index",
    "open_index",
    "records_digest",
    "reuse_part",
    "write_json",
    "write_part",
]

CACHE_FORMAT = "elva_jax.eval.embed/1"  # (the module that first wrote it; it names every cache written since)


class CacheError(UserError, RuntimeError):
    """An embedding cache that cannot be used as is (missing/corrupt part, foreign fingerprint)."""


def records_digest(records: Sequence[dict]) -> str:
    """sha256 of the records' ids and sides (text, image path, instruction, and the video path of a record
    that has one: digests of records without video are unchanged), order-sensitive."""
    h = hashlib.sha256()
    for r in records:
        it = r["item"]
        side = [r["id"], it.get("text"), it.get("image"), it.get("instruction")]
        if it.get("video") is not None:
            side.append({"video": it["video"]})
        h.update(json.dumps(side).encode())
        h.update(b"\n")
    return h.hexdigest()


def fingerprint_sha(fingerprint: dict) -> str:
    """sha256 of a fingerprint (its JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class PartedArray:
    """Read-only [N, D] float32 view over the cache's part files (memory-mapped; slices concatenate).

    Works as ``candidates`` of :func:`elva_jax.retrieval.topk.streaming_topk`; ``np.asarray`` loads it whole.
    """

    def __init__(self, paths: Sequence[Path], dim: int):
        self._parts = [np.load(p, mmap_mode="r") for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.shape = (int(self._starts[-1]), dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            return np.asarray(self)[idx]
        start, stop, step = idx.indices(self.shape[0])
        if step != 1:
            return np.asarray(self)[idx]
        pieces = []
        for p, s0 in zip(self._parts, self._starts[:-1]):
            lo, hi = max(start, s0), min(stop, s0 + len(p))
            if lo < hi:
                pieces.append(p[lo - s0 : hi - s0])
        if not pieces:
            return np.zeros((0, self.shape[1]), np.float32)
        return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self._parts]) if self._parts else np.zeros(self.shape, np.float32)
        return out if dtype is None else out.astype(dtype)


# ----------------------------------------------------------------------------------------------------
# the index


def new_index(fingerprint: dict, digest: str, ids: list[str], part_size: int) -> dict:
    """The index of a cache with no finished part yet."""
    return {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "fingerprint_sha": fingerprint_sha(fingerprint),
        "records_sha": digest,
        "n": len(ids),
        "part_size": part_size,
        "dim": None,
        "ids": ids,
        "parts": {},
    }


def open_index(
    index_path: Path, fingerprint: dict, digest: str, n: int, part_size: int, cache: str, log: Callable[[str], None]
) -> dict | None:
    """The index at ``index_path`` when it was written for this fingerprint and these records (``n`` of
    them with ``digest``, parts of ``part_size``); None when there is none (or, with ``cache="repair"``,
    when it is unreadable). Raises :class:`CacheError` for an index of another model, settings or records."""
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        assert isinstance(index, dict) and isinstance(index.get("parts"), dict)
    except (OSError, ValueError, AssertionError) as e:
        if cache == "repair":
            log(f"[elva_jax.eval] {index_path} is unreadable ({e}): starting this cache afresh")
            return None
        raise CacheError(f"{index_path}: unreadable cache index ({e}); use cache=repair or delete it") from None
    if index.get("fingerprint_sha") != fingerprint_sha(fingerprint):
        diff = _diff_keys(index.get("fingerprint") or {}, fingerprint)
        raise CacheError(
            f"{index_path}: cache written for another model or settings (differs in: {', '.join(diff) or '?'}); "
            "use another cache directory or delete this one"
        )
    if index.get("records_sha") != digest or index.get("n") != n or index.get("part_size") != part_size:
        raise CacheError(
            f"{index_path}: cache written for other records ({index.get('n')} records, part size "
            f"{index.get('part_size')}; now {n}, {part_size}); use another name or delete it"
        )
    return index


# ----------------------------------------------------------------------------------------------------
# parts


def reuse_part(index: dict, key: str, path: Path, rows: int, cache: str, log: Callable[[str], None]) -> bool:
    """Whether part ``key`` (file ``path``, ``rows`` records) is finished and intact, so it is reused. A part
    listed as finished whose file is missing or corrupt raises :class:`CacheError` (``cache="use"``) or is
    reported and dropped from the index, to be recomputed (``cache="repair"``)."""
    entry = index["parts"].get(key)
    if entry is None:
        return False
    problem = _check_part(path, entry, rows, index.get("dim"))
    if problem is None:
        return True
    if cache == "use":
        d = path.parent
        raise CacheError(
            f"{path}: embedding cache part listed as finished in {d / 'index.json'} is {problem}; "
            f"rerun with cache=repair (--cache repair) to recompute it, or delete {d}"
        )
    log(f"[elva_jax.eval] cache {path} is {problem}: recomputing it")
    del index["parts"][key]
    return False


def write_part(path: Path, emb: np.ndarray, start: int, stop: int) -> dict:
    """Write the embeddings of records [start, stop) to ``path`` (atomically); returns their index entry."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, np.float32))
    data = buf.getvalue()
    _atomic_write(path, data)
    return {
        "file": path.name,
        "start": start,
        "stop": stop,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _check_part(path: Path, entry: dict, rows: int, dim: int | None) -> str | None:
    """None if the part file matches its index entry, else what is wrong with it."""
    if not path.exists():
        return "missing"
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e})"
    if len(data) != entry.get("bytes"):
        return f"corrupt (size {len(data)} bytes, index says {entry.get('bytes')})"
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return "corrupt (sha256 mismatch)"
    try:
        arr = np.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any unreadable npy is corrupt
        return f"corrupt ({e})"
    if arr.shape != (rows, dim) or arr.dtype != np.float32:
        return f"corrupt (array {arr.shape} {arr.dtype}, expected ({rows}, {dim}) float32)"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    _atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())
