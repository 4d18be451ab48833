"""``python -m elva_jax.data.prepare``: an M-BEIR-layout directory (and NLI csvs) -> prepared tables with
the images' bytes inside, read back through :mod:`elva_jax.data.sources` (``data.source=hf`` or
``data.source=array_record``), so training opens no image file.

    python -m elva_jax.data.prepare --root MBEIR_DIR --out OUT --format array_record [--rows-per-shard 2048]
    python -m elva_jax.data.prepare --root MBEIR_DIR --out OUT --format hf
    python -m elva_jax.data.prepare --mmeb --root MMEB_DIR --out OUT [--tasks NAME ...]

Tables: every ``query/**/*.jsonl`` (queries), ``cand_pool/**/*.jsonl`` (pool) and ``nli/*.csv`` (NLI)
under the root, plus each ``--nli CSV`` given; each keeps the relative path of its file as its name, so
``data.train_files`` / ``data.pool_file`` name the same tables. ``instructions/`` and ``qrels/`` files
are copied as they are. Every jsonl/csv is parsed by the same readers as the files source (a malformed
line fails here, naming file and line). A record's video (``query_video_path`` / ``video_path``) is
stored as the file's bytes, or for a frame folder as its images' bytes in natural order. An image or
video that is missing is stored as ``None`` and counted: at training time the image policy (skip /
fail) treats it like a missing file. ``--out`` may
be a ``gs://`` path (written locally, then copied through epath).

``--mmeb``: an MMEB-V2 directory (:mod:`elva_jax.data.benchmarks.mmeb.reader`'s layout; tasks named with
``--tasks`` that are absent from it are read from the local HF cache, offline) -> a self-contained copy
under ``--out`` that ``python -m elva_jax.eval --benchmark mmeb --data OUT`` reads without the HF cache
or the source tree: each task's dataset written with ``save_to_disk`` under ``{modality}/{Task}/``
(visual documents: ``queries``, ``corpus``, ``qrels``), every image and video file (or frame folder) its
queries and candidates name copied to the same path relative to ``OUT`` (a missing one is counted and
listed, not fatal: the eval's image policy decides), and ``mmeb_tasks.json`` listing the tasks. Each
task is read back from ``OUT`` by the eval's reader before the command succeeds; tasks whose parser is
not implemented are left out and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from elva_jax.data.benchmarks import mbeir, nli
from elva_jax.data.benchmarks.mmeb.hf import from_cache, load_dataset_dir, video_dataset
from elva_jax.data.benchmarks.mmeb.reader import SUPPORTED_PARSERS, load_task, task_table
from elva_jax.data.benchmarks.mmeb.tasks import MMEB_V2_TASKS, MMEBDataError
from elva_jax.data.media.video import frame_folder_files, is_frame_folder
from elva_jax.data.progress import Progress
from elva_jax.data.rows import POOL_COLUMNS, QUERY_COLUMNS, pool_row, query_row
from elva_jax.data.sources import MANIFEST, MANIFEST_FORMAT

__all__ = ["FORMATS", "main", "prepare", "prepare_mmeb"]

FORMATS = ("array_record", "hf")
TEXT_DIRS = ("instructions", "qrels")


def _safe(name: str) -> str:
    return name.replace("/", "__").replace(".", "_")


def _image_bytes(root, img_path: str | None, counts: dict) -> bytes | None:
    if not img_path:
        return None
    path = mbeir.resolve_image_path(root, img_path)
    if not path.exists():
        counts["missing"] += 1
        counts["missing_paths"].append(str(path))
        return None
    counts["stored"] += 1
    return path.read_bytes()


def _video_data(root, video_path: str | None, counts: dict) -> tuple[bytes | None, list[bytes] | None] | None:
    """(file bytes, frame bytes) of a record's video: a file's bytes, or a frame folder's images' bytes in
    the natural order the pipeline reads them (``video.frame_folder_files``); (None, None) when missing
    (counted); None without a video."""
    if not video_path:
        return None
    path = mbeir.resolve_image_path(root, video_path)
    if not path.exists():
        counts["videos_missing"] += 1
        counts["missing_paths"].append(str(path))
        return None, None
    counts["videos_stored"] += 1
    if is_frame_folder(str(path)):
        return None, [epath.Path(f).read_bytes() for f in frame_folder_files(str(path))]
    return path.read_bytes(), None


def _hf_features(kind: str):
    import datasets as hf

    s = hf.Value("string")
    if kind == "queries":
        cols = dict(
            qid=s,
            query_txt=s,
            query_img_path=s,
            query_modality=s,
            pos_cand_list=hf.List(s),
            neg_cand_list=hf.List(s),
            task_id=hf.Value("int64"),
            query_src_content=s,
            img_bytes=hf.Value("binary"),
            query_video_path=s,
            query_video_fps=hf.Value("float64"),
            **_video_features(hf),
        )
    elif kind == "pool":
        cols = dict(did=s, txt=s, img_path=s, modality=s, src_content=s, img_bytes=hf.Value("binary"))
        cols |= dict(video_path=s, video_fps=hf.Value("float64"), **_video_features(hf))
    else:
        cols = dict(sent0=s, sent1=s, hard_neg=s)
    return hf.Features(cols)


def _video_features(hf) -> dict:
    return {"video_bytes": hf.Value("binary"), "video_frames": hf.List(hf.Value("binary"))}


def _table_rows(root, rel: str, kind: str, counts: dict, image_root) -> tuple[int, Iterator[dict], dict]:
    """(row count, row iterator with image bytes, small id columns) of one source file."""
    path = epath.Path(root) / rel if not os.path.isabs(rel) and "://" not in rel else epath.Path(rel)
    root = image_root or root
    if kind == "queries":
        items = mbeir.read_queries(path)
        rows = (
            query_row(
                q,
                _image_bytes(root, q.query_img_path, counts),
                src_as_json=True,
                video=_video_data(root, q.query_video_path, counts),
            )
            for q in items
        )
        cols = {c: [query_row(q)[c] for q in items] for c in QUERY_COLUMNS}
    elif kind == "pool":
        items = list(mbeir.read_pool(path).values())
        rows = (
            pool_row(
                c,
                _image_bytes(root, c.img_path, counts),
                src_as_json=True,
                video=_video_data(root, c.video_path, counts),
            )
            for c in items
        )
        cols = {c: [pool_row(x)[c] for x in items] for c in POOL_COLUMNS}
    else:
        items = nli.read_nli_csv(path)
        rows = ({"sent0": a, "sent1": b, "hard_neg": c} for a, b, c in items)
        cols = {}
    return len(items), rows, cols


def _write_array_record(out: str, name: str, n: int, rows: Iterator[dict], rows_per_shard: int, prog: Progress):
    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    n_shards = max(1, -(-n // rows_per_shard))
    files = [f"tables/{_safe(name)}-{k:05d}-of-{n_shards:05d}.array_record" for k in range(n_shards)]
    os.makedirs(os.path.join(out, "tables"), exist_ok=True)
    rows = iter(rows)
    for k, rel in enumerate(files):
        # group_size:1 -> each record is its own chunk: random access reads one record
        writer = ArrayRecordWriter(os.path.join(out, rel), "group_size:1")
        for _ in range(min(rows_per_shard, n - k * rows_per_shard)):
            writer.write(msgpack.packb(next(rows), use_bin_type=True))
            prog.update()
        writer.close()
    return files


_HF_FEED: dict = {}  # the rows and progress of the table being written (datasets hashes the generator's args)


def _hf_rows(key: str, columns: tuple[str, ...]):
    rows, prog = _HF_FEED[key]
    for r in rows:
        prog.update()
        yield {c: r.get(c) for c in columns}  # columns a row lacks (no video) are null


def _write_hf(out: str, name: str, kind: str, rows: Iterator[dict], prog: Progress, tmp: str):
    import datasets as hf

    rel = f"tables/{_safe(name)}.hf"
    _HF_FEED[name] = (rows, prog)
    bars = hf.is_progress_bar_enabled()
    hf.disable_progress_bars()  # this command prints its own progress line
    try:
        ds = hf.Dataset.from_generator(
            _hf_rows,
            features=_hf_features(kind),
            gen_kwargs={"key": name, "columns": tuple(_hf_features(kind))},
            cache_dir=os.path.join(tmp, "hf_cache"),
            keep_in_memory=False,
        )
        ds.save_to_disk(os.path.join(out, rel))
    finally:
        del _HF_FEED[name]
        if bars:
            hf.enable_progress_bars()
    return [rel]


def discover(root: str) -> dict[str, str]:
    """{relative path: kind} of the tables under an M-BEIR-layout root."""
    r = epath.Path(root)
    found = {}
    for sub, pattern, kind in (("query", "*/*.jsonl", "queries"), ("cand_pool", "*/*.jsonl", "pool")):
        found |= {str(p)[len(str(r)) + 1 :]: kind for p in sorted((r / sub).glob(pattern))}
    found |= {str(p)[len(str(r)) + 1 :]: "nli" for p in sorted((r / "nli").glob("*.csv"))}
    return found


def prepare(
    root: str | None,
    out: str,
    *,
    fmt: str = "array_record",
    nli_files: tuple[str, ...] = (),
    rows_per_shard: int = 2048,
    image_root: str | None = None,
    log=None,
) -> dict:
    """Write the prepared tables of ``root`` (None: only ``nli_files``) under ``out``; returns the manifest.
    ``image_root``: the directory image paths are relative to (an MRBench directory: its M-BEIR root;
    default ``root``)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    remote_out = "://" in str(out)
    if not remote_out and os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty")
    tables = discover(root) if root else {}
    tables |= {str(f): "nli" for f in nli_files}
    if not tables:
        raise FileNotFoundError(f"no query/, cand_pool/ jsonl or nli/ csv files under {root} (and no --nli)")
    counts = {"stored": 0, "missing": 0, "videos_stored": 0, "videos_missing": 0, "missing_paths": []}
    manifest: dict = {
        "format": MANIFEST_FORMAT,
        "backend": fmt,
        "source_root": str(image_root or root),  # what image labels are resolved against
        "tables": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "out") if remote_out else str(out)
        os.makedirs(local, exist_ok=True)
        for name, kind in tables.items():
            n, rows, cols = _table_rows(root or "", name, kind, counts, image_root)
            key = os.path.basename(name) if name in nli_files else name
            with Progress(f"prepare {key}", total=n, unit="rows", log=log) as prog:
                if fmt == "array_record":
                    files = _write_array_record(local, key, n, rows, rows_per_shard, prog)
                else:
                    files = _write_hf(local, key, kind, rows, prog, tmp)
            entry = {"kind": kind, "rows": n, "files": files}
            if fmt == "array_record" and cols:
                entry["columns"] = f"tables/{_safe(key)}.columns.json"
                with open(os.path.join(local, entry["columns"]), "w") as f:
                    json.dump(cols, f)
            manifest["tables"][key] = entry
        text_files = []
        for d in TEXT_DIRS if root else ():
            base = epath.Path(root)
            for p in sorted([*(base / d).glob("*"), *(base / d).glob("*/*")]):
                if p.is_dir():
                    continue
                rel = str(p)[len(str(base)) + 1 :]
                os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
                with open(os.path.join(local, rel), "wb") as f:
                    f.write(p.read_bytes())
                text_files.append(rel)
        manifest["text_files"] = text_files
        manifest["images"] = {"stored": counts["stored"], "missing": counts["missing"]}
        manifest["videos"] = {"stored": counts["videos_stored"], "missing": counts["videos_missing"]}
        manifest["missing_images"] = counts["missing_paths"][:100]  # images and videos
        with open(os.path.join(local, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if remote_out:
            _upload(local, out)
    return manifest


def _upload(local: str, out: str) -> None:
    """Copy the local tree ``local`` to ``out`` (any epath URL) file by file."""
    dst = epath.Path(out)
    for dirpath, _, names in os.walk(local):
        for nm in names:
            src = os.path.join(dirpath, nm)
            target = dst / os.path.relpath(src, local)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fi, target.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)


def _mmeb_specs(root: str, names) -> list[dict]:
    """The task specs to prepare: ``root``'s table (all, or the named ones); a named task absent from it
    gets its MMEB-V2 table entry (read from the HF cache)."""
    try:
        table = task_table(root)
    except MMEBDataError:
        if not names:
            raise
        table = []
    if not names:
        return table
    known = {t["name"]: t for t in table}
    out = []
    for n in names:
        if n in known:
            out.append(known[n])
        elif n in MMEB_V2_TASKS:
            mod, meta, parser = MMEB_V2_TASKS[n]
            out.append({"name": n, "modality": mod, "meta_task": meta, "parser": parser})
        else:
            raise MMEBDataError(f"unknown MMEB task {n!r}: not under {root} and not an MMEB-V2 task name")
    return out


def prepare_mmeb(root: str, out: str, *, tasks=(), log=None) -> dict:
    """Write the self-contained MMEB copy of ``root`` (all its tasks, or ``tasks``) under ``out`` (module
    docstring); returns {"tasks": [names], "skipped": {name: why}, "media": {"copied", "missing"},
    "missing_media": [first 100 paths]}."""
    log = log or (lambda s: print(s, flush=True))
    remote_out = "://" in str(out)
    if not remote_out and os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty")
    if "://" in str(root):
        raise ValueError("--mmeb reads a local MMEB directory (--root); copy a remote one locally first")
    src = os.path.abspath(root)
    specs = _mmeb_specs(src, tuple(tasks))
    summary: dict = {"tasks": [], "skipped": {}, "media": {"copied": 0, "missing": 0}, "missing_media": []}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "out") if remote_out else str(out)
        os.makedirs(local, exist_ok=True)
        kept = []
        for spec in specs:
            name, mod = spec["name"], spec["modality"]
            if spec["parser"] not in SUPPORTED_PARSERS:
                summary["skipped"][name] = f"parser {spec['parser']!r} not implemented"
                continue
            d = epath.Path(src) / mod / name
            parts = ("queries", "corpus", "qrels") if mod == "visdoc" else (None,)
            for part in parts:
                where = d / part if part else d
                if mod == "video":
                    ds = video_dataset(name, spec["parser"], src)  # MVBench: its subsets, one table
                elif d.is_dir():
                    ds = load_dataset_dir(where)
                else:
                    ds = from_cache(name, part, d)
                target = os.path.join(local, mod, name, *([part] if part else []))
                ds.save_to_disk(target)
            t = load_task(spec, src, materialize_dir=os.path.join(tmp, "materialized"))
            media = sorted({p for s in t.queries + t.candidates for p in (s.image, s.video) if p})
            with Progress(f"prepare mmeb {name}", total=len(media), unit="files", log=log) as prog:
                for p in media:
                    prog.update(1)
                    rel = os.path.relpath(os.path.abspath(p), src)
                    if rel.startswith(".."):  # written by the reader (visual-document bytes): inside the dataset
                        continue
                    if not os.path.exists(p):
                        summary["media"]["missing"] += 1
                        summary["missing_media"].append(str(p))
                        continue
                    dst = os.path.join(local, str(rel))
                    if not os.path.exists(dst):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        if os.path.isdir(p):  # a frame folder
                            shutil.copytree(p, dst)
                        else:
                            shutil.copyfile(p, dst)
                        summary["media"]["copied"] += 1
            kept.append(spec)
            summary["tasks"].append(name)
        with open(os.path.join(local, "mmeb_tasks.json"), "w") as f:
            json.dump({"tasks": kept}, f, indent=1)
        for spec in kept:  # the copy reads back with the eval's reader
            load_task(spec, local, materialize_dir=os.path.join(tmp, "check"))
        summary["missing_media"] = summary["missing_media"][:100]
        if remote_out:
            _upload(local, out)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="M-BEIR-layout directory (local or gs://)")
    ap.add_argument("--out", required=True, help="output directory (empty or absent; local or gs://)")
    ap.add_argument("--format", default="array_record", choices=FORMATS)
    ap.add_argument("--nli", nargs="*", default=(), help="extra NLI csv files (table name: the file name)")
    ap.add_argument("--rows-per-shard", type=int, default=2048)
    ap.add_argument("--image-root", help="directory the image paths are relative to (MRBench: its M-BEIR root)")
    ap.add_argument("--mmeb", action="store_true", help="--root is an MMEB-V2 directory: write a self-contained copy")
    ap.add_argument("--tasks", nargs="*", default=(), help="--mmeb: the tasks to copy (default: all under --root)")
    a = ap.parse_args(argv)
    if a.mmeb:
        if not a.root:
            ap.error("--mmeb needs --root (the MMEB directory)")
        s = prepare_mmeb(a.root, a.out, tasks=tuple(a.tasks))
        print(
            f"[elva_jax] prepared {len(s['tasks'])} MMEB tasks ({s['media']['copied']} media files copied, "
            f"{s['media']['missing']} missing) under {a.out}"
        )
        for n, why in s["skipped"].items():
            print(f"[elva_jax]   left out {n}: {why}")
        for p in s["missing_media"][:10]:
            print(f"[elva_jax]   missing file: {p}")
        return 0
    if a.tasks:
        ap.error("--tasks needs --mmeb")
    if not a.root and not a.nli:
        ap.error("give --root and/or --nli")
    m = prepare(
        a.root, a.out, fmt=a.format, nli_files=tuple(a.nli), rows_per_shard=a.rows_per_shard, image_root=a.image_root
    )
    print(
        f"[elva_jax] prepared {len(m['tables'])} tables ({m['images']['stored']} images stored, "
        f"{m['images']['missing']} missing; {m['videos']['stored']} videos stored, {m['videos']['missing']} "
        f"missing) as {a.format} under {a.out}"
    )
    for p in m["missing_images"][:10]:
        print(f"[elva_jax]   missing image or video: {p}")
    return 0


if __name__ == "__main__":
    # run the imported module's main: `datasets` hashes the row generator by reference, which a function
    # of `__main__` is not
    from elva_jax.data.prepare import main as _main

    raise SystemExit(_main())
