"""MMEB-V2 reader (VLM2Vec's benchmark): image, video and visual-document tasks from HF ``datasets``.

Task discovery (:func:`task_table`, :func:`select`) and the parser dispatch (:func:`load_task`); the task
table and model are :mod:`.tasks`', the datasets' loading :mod:`.hf`'s, the parsers :mod:`.image_tasks`
and :mod:`.video_tasks`.

Each task becomes an :class:`MMEBTask`: query sides, a de-duplicated candidate list (a candidate is
identified by its *name*, as in VLM2Vec's eval: two entries with the same name are one candidate), and
per query either its own candidate list (``eval_type`` "local": the row's candidates, the positive
first) or the whole candidate list ("global"), plus the relevant candidates with their gains.

Columns, per VLM2Vec's V2 loaders (``src/data/eval_dataset/*``): image and visual-document tasks in
:mod:`.image_tasks`, video tasks in :mod:`.video_tasks`.

Directory layout (``root``; a task directory holds a ``save_to_disk`` dataset or ``*.parquet`` files)::

    image/{Task}/                         image tasks; image paths relative to image-tasks/
    image-tasks/...
    visdoc/{Task}/{queries,corpus,qrels}/ visual-document tasks (corpus images embedded or relative paths)
    video/{Task}/                         video tasks; video paths relative to video-tasks/{Task}/
    video/MVBench/{subset}/               MVBench: one dataset per subset, or one with a ``subset`` column
    video-tasks/{Task}/...                video files or frame folders (directories of images)
    mmeb_tasks.json                       optional: {"tasks": [{"name", "modality", "meta_task", "parser",
                                          "labels"?, "query_instruction"?}]}; default: the MMEB-V2 table

A task absent under ``root`` is read from the local HF cache (offline mode, never the hub) when its hub
id is known (:data:`~elva_jax.data.benchmarks.mmeb.tasks.HUB`); otherwise, or when the cache lacks it,
:class:`~elva_jax.data.benchmarks.mmeb.tasks.MMEBDataError` names the path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from elva_jax.data.benchmarks.mmeb.image_tasks import IMAGE_PARSERS, VISDOC_PARSERS, image_task, visdoc_task
from elva_jax.data.benchmarks.mmeb.tasks import MMEB_V2_TASKS, MMEBDataError, MMEBTask
from elva_jax.data.benchmarks.mmeb.video_tasks import VIDEO_PARSERS, video_task

__all__ = ["SUPPORTED_PARSERS", "load_task", "select", "task_table"]

SUPPORTED_PARSERS = IMAGE_PARSERS + VIDEO_PARSERS + VISDOC_PARSERS


def task_table(root: str | Path) -> list[dict]:
    """The tasks of ``root``: its ``mmeb_tasks.json`` manifest, else every MMEB-V2 task name found as
    ``{modality}/{name}`` under ``root`` (table order). Each: {"name", "modality", "meta_task", "parser", ...}."""
    root = Path(root)
    if not root.is_dir():
        raise MMEBDataError(f"MMEB data directory {root} not found")
    man = root / "mmeb_tasks.json"
    if man.is_file():
        try:
            tasks = json.loads(man.read_text(encoding="utf-8"))["tasks"]
        except (ValueError, KeyError, TypeError) as e:
            raise MMEBDataError(f"{man}: not a task manifest ({{'tasks': [...]}}): {e}") from None
        out = []
        for i, t in enumerate(tasks):
            miss = [k for k in ("name", "modality", "meta_task", "parser") if not isinstance(t, dict) or k not in t]
            if miss:
                raise MMEBDataError(f"{man}: task {i} lacks {miss}")
            out.append(dict(t))
        return out
    out = []
    for name, (mod, meta, parser) in MMEB_V2_TASKS.items():
        if (root / mod / name).is_dir():
            out.append({"name": name, "modality": mod, "meta_task": meta, "parser": parser})
    if not out:
        raise MMEBDataError(
            f"{root}: no MMEB task found (neither mmeb_tasks.json nor image/, video/, visdoc/ task directories)"
        )
    return out


def load_task(spec: dict, root: str | Path, *, materialize_dir: str | Path | None = None) -> MMEBTask:
    """Read one task of :func:`task_table` under ``root``. ``materialize_dir``: where corpus images stored
    as bytes are written as ``{task}/{corpus-id}.png`` (VLM2Vec writes them under its image root)."""
    root = Path(root)
    p = spec["parser"]
    if p in IMAGE_PARSERS:
        return image_task(spec, root)
    if p in VISDOC_PARSERS:
        return visdoc_task(spec, root, Path(materialize_dir) if materialize_dir else None)
    if p in VIDEO_PARSERS:
        return video_task(spec, root)
    raise MMEBDataError(
        f"task {spec['name']}: parser {p!r} is not supported (supported: "
        f"{', '.join(IMAGE_PARSERS + VIDEO_PARSERS + VISDOC_PARSERS)})"
    )


def select(tasks: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Keep the named tasks (all when empty); an unknown name is an error listing the known ones."""
    if not names:
        return list(tasks)
    known = [t["name"] for t in tasks]
    bad = [n for n in names if n not in known]
    if bad:
        raise MMEBDataError(f"unknown MMEB task(s) {bad}; this data has: {', '.join(known)}")
    return [t for t in tasks if t["name"] in set(names)]
