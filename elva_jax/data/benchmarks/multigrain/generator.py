"""A small, seeded multi-grain retrieval dataset written in M-BEIR layout (dataset id 10, "multigrain").

This module writes the files (:func:`generate`; layout in the package docstring), keeps a run's bundled
set (:func:`ensure_generated`) and is the command's ``main``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from elva_jax.data.benchmarks.multigrain.build import DATASET_ID, DATASET_NAME, TASKS, Builder, build_split
from elva_jax.data.progress import Progress
from elva_jax.errors import UserError

__all__ = [
    "GENERATED_MARKER",
    "MRBENCH_TASKS",
    "BundledSizeError",
    "GeneratorTargetError",
    "ensure_generated",
    "generate",
    "main",
]

MRBENCH_TASKS = (0, 3, 4, 7)
_INSTRUCTIONS = {
    0: (
        "Find an image that matches the given description of shapes.",
        "Retrieve the picture showing exactly the shapes described.",
        "Identify the image whose colours, shapes, sizes and positions match the caption.",
    ),
    1: (
        "Find a caption that describes the same arrangement of shapes.",
        "Retrieve the sentence describing the same shapes in the same places.",
        "Identify a description equivalent to the given one.",
    ),
    3: (
        "Find a caption describing every shape in this image.",
        "Retrieve the description that matches the colours, shapes, sizes and positions shown.",
        "Identify the caption of this picture.",
    ),
    4: (
        "Find another picture of the same shapes in the same places.",
        "Retrieve an image showing the same scene as this one.",
        "Identify the image with identical shapes, colours, sizes and positions.",
    ),
    7: (
        "Apply the requested change to the image and find the resulting picture.",
        "Retrieve the image that shows this picture after the described edit.",
        "Identify the edited version of the image.",
    ),
}


def _jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _text(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _did_order(did: str) -> int:
    return int(did.split(":")[1])


#: written last by `generate`: the files it wrote (one relative path a line); `--overwrite` deletes only those
GENERATED_MARKER = "ELVA_GENERATED"


class GeneratorTargetError(UserError, FileExistsError):
    """The output directory holds data this generator did not write."""


def generate(root: str | Path, *, seed: int = 0, n_train: int = 32, n_test: int = 16, overwrite: bool = False) -> dict:
    """Write the dataset under ``root``; return a summary dict (counts, relative paths, ``root``).

    ``n_train`` / ``n_test`` = base scenes per split = queries per task per split. Each base scene costs
    7 PNGs (defaults: 336 images, about a second). ``root`` must be empty or absent, unless
    ``overwrite`` and ``root`` holds an earlier output of this generator: then exactly the files that
    output wrote (listed in its ``ELVA_GENERATED`` marker) are deleted first; anything else stays.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    root = Path(root)
    marker = root / GENERATED_MARKER
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise GeneratorTargetError(f"{root} is not empty (pass overwrite=True / --overwrite)")
        if not marker.is_file():
            raise GeneratorTargetError(
                f"{root} is not empty and holds no {GENERATED_MARKER} marker: not an output of this generator, "
                "so --overwrite deletes nothing there; choose an empty directory"
            )
        for rel in marker.read_text(encoding="utf-8").splitlines():
            if rel and (root / rel).is_file():
                (root / rel).unlink()
        marker.unlink()
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()
    root.mkdir(parents=True, exist_ok=True)
    before = {p for p in root.rglob("*") if p.is_file()}
    b = Builder(root, random.Random(seed))
    b.seed = seed
    b.progress = Progress("generate bundled images", total=7 * (n_train + n_test), unit="images")
    build_split(b, "train", n_train)
    build_split(b, "test", n_test)

    name = f"mbeir_{DATASET_NAME}"
    pools: dict[int, list[str]] = {}
    for task, queries in b.queries["test"].items():
        dids = {d for q in queries for d in q["pos_cand_list"] + q["neg_cand_list"]}
        pools[task] = sorted(dids, key=_did_order)
    train_dids = sorted(
        {d for qs in b.queries["train"].values() for q in qs for d in q["pos_cand_list"] + q["neg_cand_list"]},
        key=_did_order,
    )
    test_dids = sorted({d for p in pools.values() for d in p}, key=_did_order)

    def qrels_lines(queries: list[dict]) -> list[str]:
        return [f"{q['qid']} 0 {d} 1 {q['task_id']}" for q in queries for d in q["pos_cand_list"]]

    for split, by_task in b.queries.items():
        for task, queries in by_task.items():
            _jsonl(root / "query" / split / f"{name}_task{task}_{split}.jsonl", queries)
    _jsonl(
        root / "query" / "train" / f"{name}_union_train.jsonl", (q for qs in b.queries["train"].values() for q in qs)
    )
    for task, dids in pools.items():
        _jsonl(root / "cand_pool" / "local" / f"{name}_task{task}_cand_pool.jsonl", (b.candidates[d] for d in dids))
        _text(root / "qrels" / "test" / f"{name}_task{task}_test_qrels.txt", qrels_lines(b.queries["test"][task]))
    _jsonl(root / "cand_pool" / "global" / f"{name}_union_train_cand_pool.jsonl", (b.candidates[d] for d in train_dids))
    _jsonl(root / "cand_pool" / "global" / f"{name}_union_test_cand_pool.jsonl", (b.candidates[d] for d in test_dids))

    header = "\t".join(["query_modality", "cand_modality", "dataset", "dataset_id", "prompt_1", "prompt_2", "prompt_3"])
    rows = [header] + ["\t".join([*TASKS[t], DATASET_NAME, str(DATASET_ID), *_INSTRUCTIONS[t]]) for t in TASKS]
    _text(root / "instructions" / "query_instructions.tsv", rows)

    # MRBench-style subset: tasks 0, 3, 4, 7; query scene with >= 2 objects; full local pools.
    multi = {g["qid"] for g in b.grains if g["split"] == "test" and g["n_objects"] >= 2}
    mrbench_counts = {}
    for task in MRBENCH_TASKS:
        queries = [q for q in b.queries["test"][task] if q["qid"] in multi]
        mrbench_counts[task] = len(queries)
        _jsonl(root / "mrbench" / "query" / "test" / f"{name}_task{task}_test.jsonl", queries)
        _jsonl(
            root / "mrbench" / "cand_pool" / "local" / f"{name}_task{task}_cand_pool.jsonl",
            (b.candidates[d] for d in pools[task]),
        )
        _text(root / "mrbench" / "qrels" / "test" / f"{name}_task{task}_test_qrels.txt", qrels_lines(queries))

    (root / "nli").mkdir(parents=True, exist_ok=True)
    with open(root / "nli" / f"{DATASET_NAME}_nli_train.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sent0", "sent1", "hard_neg"])
        writer.writerows(b.nli_rows)

    _jsonl(root / "meta" / "scenes.jsonl", b.scenes.values())
    _jsonl(root / "meta" / "candidates.jsonl", b.cand_meta)
    _jsonl(root / "meta" / "query_grains.jsonl", b.grains)
    summary = {
        "dataset": DATASET_NAME,
        "dataset_id": DATASET_ID,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_scenes": len(b.scenes),
        "n_images": b.n_images,
        "n_candidates": len(b.candidates),
        "queries": {split: {str(t): len(qs) for t, qs in by_task.items()} for split, by_task in b.queries.items()},
        "local_pool_sizes": {str(t): len(p) for t, p in pools.items()},
        "mrbench_queries": {str(t): n for t, n in mrbench_counts.items()},
        "nli_rows": len(b.nli_rows),
    }
    summary["files"] = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".png"
    ) + ["meta/summary.json"]
    (root / "meta" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in before)
    marker.write_text("\n".join(written) + "\n", encoding="utf-8")
    return {**summary, "root": str(root)}


class BundledSizeError(UserError, ValueError):
    """An existing bundled set was generated with other sizes than the run asks for."""


def ensure_generated(root: str | Path, *, n_train: int = 32, n_test: int = 16, announce: bool = False) -> Path:
    """The bundled set under ``root``: generated (seed 0) when ``root`` holds none, else checked to have
    ``n_train`` / ``n_test`` base scenes (an existing set of other sizes is refused, never overwritten)."""
    root = Path(root)
    summary = root / "meta" / "summary.json"
    if not summary.is_file():
        if announce:
            print(f"[elva_jax] {root} has no bundled data: generating the synthetic bundled set there", flush=True)
        generate(root, seed=0, n_train=n_train, n_test=n_test)
        return root
    have = json.loads(summary.read_text(encoding="utf-8"))
    if (have.get("n_train"), have.get("n_test")) != (n_train, n_test):
        raise BundledSizeError(
            f"{summary}: this bundled set has {have.get('n_train')} train / {have.get('n_test')} test scenes, the "
            f"run asks for {n_train} / {n_test} (data.bundled_train_scenes / data.bundled_test_scenes): use another "
            "data.root or run.dir, or the sizes it was made with"
        )
    return root


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m elva_jax.data.benchmarks.multigrain --out DIR [--seed S] [--n-train N] [--n-test N]
    [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m elva_jax.data.benchmarks.multigrain", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root (empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=32, help="base scenes (queries per task) in train")
    parser.add_argument("--n-test", type=int, default=16, help="base scenes (queries per task) in test")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in --out")
    args = parser.parse_args(argv)
    summary = generate(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=1))
    return summary
