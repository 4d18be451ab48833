"""HF ``datasets`` of MMEB tasks: a ``save_to_disk`` directory or ``*.parquet`` files under the data root,
else the local HF cache (offline mode, never the hub); column checks whose errors name the path."""

from __future__ import annotations

import os
from pathlib import Path

from elva_jax.data.benchmarks.mmeb.tasks import HUB, MVBENCH_HUB, MVBENCH_SUBSETS, MMEBDataError

__all__ = ["column", "from_cache", "load_dataset_dir", "nonempty", "video_dataset"]


def _offline() -> None:
    """HF offline mode for this process: the environment variables, and the flags that huggingface_hub
    and datasets read from them at import (already imported modules would otherwise still go online)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def load_dataset_dir(path: str | Path, split: str = "test"):
    """A ``datasets.Dataset`` from a ``save_to_disk`` directory (a DatasetDict gives ``split``, or its only
    split) or from the ``*.parquet`` files under ``path`` (sorted). Errors name the path."""
    _offline()
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    if not path.is_dir():
        raise MMEBDataError(f"{path}: dataset directory not found")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise MMEBDataError(f"{path}: cannot read the saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split in ds:
                return ds[split]
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise MMEBDataError(f"{path}: DatasetDict without a {split!r} split (has {list(ds)})")
        return ds
    files = sorted(str(p) for p in path.rglob("*.parquet"))
    if not files:
        raise MMEBDataError(f"{path}: neither a save_to_disk dataset (state.json) nor *.parquet files")
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train", keep_in_memory=True)
    except Exception as e:  # pyarrow / datasets raise many kinds on a bad file
        raise MMEBDataError(f"{path}: cannot read the parquet files: {e}") from None


def from_cache(name: str, config: str | None, tried: Path):
    """Task ``name`` (``config``: a visual-document part, else the hub id's) from the local HF cache;
    ``tried``: the directory that was missing, named in the error."""
    if name not in HUB:
        raise MMEBDataError(f"task {name}: {tried} not found (and no hub id known for the HF-cache fallback)")
    repo, sub, split = HUB[name]
    _offline()
    import datasets

    try:
        return datasets.load_dataset(repo, config if config is not None else sub, split=split)
    except Exception as e:  # offline: a missing cache entry raises ConnectionError / FileNotFoundError / ValueError
        raise MMEBDataError(
            f"task {name}: {tried} not found and {repo} ({config or sub}) is not in the local HF cache "
            f"(offline mode): {type(e).__name__}"
        ) from None


def column(ds, col: str, where: str) -> list:
    """Column ``col`` of ``ds``; MMEBDataError naming ``where`` when it is missing."""
    if col not in ds.column_names:
        raise MMEBDataError(f"{where}: column {col!r} missing (has {ds.column_names})")
    return ds[col]


def nonempty(v, where: str, row: int, col: str) -> None:
    """MMEBDataError naming the row and column unless ``v`` is a non-empty list."""
    if not isinstance(v, list) or not v:
        raise MMEBDataError(f"{where}, row {row}: {col!r} must be a non-empty list, got {v!r}")


def video_dataset(name: str, parser: str, root: str | Path):
    """The rows of video task ``name``: the dataset directory ``video/{name}``, else the local HF cache.
    MVBench: the subset directories ``video/MVBench/{subset}`` present (in :data:`MVBENCH_SUBSETS` order)
    concatenated with a ``subset`` column, or one dataset that has that column; from the cache, every
    subset of :data:`MVBENCH_HUB` (as VLM2Vec's ``load_hf_dataset_multiple_subset``)."""
    d = Path(root) / "video" / name
    if parser != "mvbench":
        return load_dataset_dir(d) if d.is_dir() else from_cache(name, None, d)
    import datasets

    if d.is_dir():
        subs = [x for x in MVBENCH_SUBSETS if (d / x).is_dir()]
        if not subs:
            ds = load_dataset_dir(d)
            if "subset" not in ds.column_names:
                raise MMEBDataError(
                    f"{d}: MVBench needs one directory per subset ({', '.join(MVBENCH_SUBSETS)}) or a 'subset' column"
                )
            return ds
        parts = [(x, load_dataset_dir(d / x)) for x in subs]
    else:
        _offline()
        repo, split = MVBENCH_HUB
        parts = []
        for x in MVBENCH_SUBSETS:
            try:
                parts.append((x, datasets.load_dataset(repo, x, split=split)))
            except Exception as e:  # offline: a missing cache entry raises several kinds
                raise MMEBDataError(
                    f"task {name}: {d} not found and {repo} ({x}) is not in the local HF cache (offline mode): "
                    f"{type(e).__name__}"
                ) from None
    parts = [p if "subset" in p.column_names else p.add_column("subset", [x] * len(p)) for x, p in parts]
    return datasets.concatenate_datasets(parts)
