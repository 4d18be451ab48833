"""Evaluation task definitions: M-BEIR's 16 tasks, the bundled multi-grain set, MRBench-format subsets
and zero-shot (query, pool, qrels) triples; loading with validation; deterministic query instructions.

M-BEIR (UniIR layout under the M-BEIR root; ``{d}`` dataset, ``{t}`` task id)::

    query/test/mbeir_{d}_task{t}_test.jsonl
    cand_pool/local/mbeir_{d}_task{t}_cand_pool.jsonl         (mscoco: mbeir_mscoco_task{t}_test_cand_pool.jsonl)
    qrels/test/mbeir_{d}_task{t}_test_qrels.txt
    cand_pool/global/mbeir_union_test_cand_pool.jsonl         global pool (~5.6M candidates)

K (the reported Recall@K) is 10 for fashion200k_task0, fashion200k_task3 and fashioniq_task7, else 5.
The bundled set (:mod:`elva_jax.data.benchmarks.multigrain`) gives tasks 0, 1, 3, 4, 7 with their local pools
(``multigrain_task{t}``, K=5) plus its MRBench subset (``mrbench/``; ``mrbench_multigrain_task{t}``).
An MRBench-format directory has M-BEIR's layout with test files only; its image paths are relative to
the M-BEIR root it was filtered from. A zero-shot task is any M-BEIR-format triple.

Instructions: each query gets one prompt of its instruction-table entry (dataset id, query modality,
candidate modality = the modality of its first qrels positive), chosen by
:func:`elva_jax.data.prompts.choose_instruction`: ``crc32(qid)`` (default, the training pipeline's
rule), ``blake2b(f"{seed}:{qid}")`` with a seed, or a fixed index. The rule is recorded in results.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

from elva_jax.data.benchmarks import mbeir
from elva_jax.data.benchmarks.mbeir import Candidate, Query
from elva_jax.data.errors import DataFormatError, utf8_lines
from elva_jax.data.prompts import choose_instruction
from elva_jax.data.records import corpus_records
from elva_jax.errors import UserError

__all__ = [
    "MBEIR_TASKS",
    "EvalDataError",
    "InstructionRule",
    "LoadedTask",
    "TaskSpec",
    "bundled_tasks",
    "candidate_records",
    "load_task",
    "mask_phrase",
    "mbeir_k",
    "mbeir_tasks",
    "mrbench_tasks",
    "parse_task_arg",
    "query_records",
    "read_grains",
    "select_tasks",
    "zeroshot_task",
]

#: (dataset, task id, K) of the 16 M-BEIR evaluation tasks, in the paper's table order.
MBEIR_TASKS: tuple[tuple[str, int, int], ...] = (
    ("visualnews", 0, 5),
    ("mscoco", 0, 5),
    ("fashion200k", 0, 10),
    ("webqa", 1, 5),
    ("edis", 2, 5),
    ("webqa", 2, 5),
    ("visualnews", 3, 5),
    ("mscoco", 3, 5),
    ("fashion200k", 3, 10),
    ("nights", 4, 5),
    ("oven", 6, 5),
    ("infoseek", 6, 5),
    ("fashioniq", 7, 10),
    ("cirr", 7, 5),
    ("oven", 8, 5),
    ("infoseek", 8, 5),
)
MBEIR_GLOBAL_POOL = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
BUNDLED_GLOBAL_POOL = "cand_pool/global/mbeir_multigrain_union_test_cand_pool.jsonl"
BUNDLED_TASK_IDS = (0, 1, 3, 4, 7)
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"
DEFAULT_K = 5


class EvalDataError(UserError, ValueError):
    """Evaluation data that cannot be scored (missing file, query without qrels, empty set)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where one evaluation task's files are. ``image_root``: what image paths are relative to."""

    name: str
    k: int
    group: str  # "mbeir" | "bundled" | "mrbench" | "zeroshot"
    query_file: Path
    pool_file: Path
    qrels_file: Path
    image_root: Path
    global_pool_file: Path | None = None
    instructions_file: Path | None = None


def mbeir_k(name: str) -> int:
    """K of an M-BEIR task name such as "fashioniq_task7" (or "mbeir_fashioniq_task7"); 5 if unknown."""
    short = name.removeprefix("mbeir_")
    for d, t, k in MBEIR_TASKS:
        if short == f"{d}_task{t}":
            return k
    return DEFAULT_K


def _instructions(root: Path) -> Path | None:
    p = root / INSTRUCTIONS_FILE
    return p if p.is_file() else None


def mbeir_tasks(root: str | Path, *, instructions_file: str | Path | None = None) -> list[TaskSpec]:
    """The 16 M-BEIR test tasks under ``root`` (files are checked when loaded, not here)."""
    root = Path(root)
    ins = Path(instructions_file) if instructions_file else _instructions(root)
    out = []
    for d, t, k in MBEIR_TASKS:
        name = f"mbeir_{d}_task{t}"
        pool = f"{name}_test_cand_pool.jsonl" if d == "mscoco" else f"{name}_cand_pool.jsonl"
        out.append(
            TaskSpec(
                name=f"{d}_task{t}",
                k=k,
                group="mbeir",
                query_file=root / "query" / "test" / f"{name}_test.jsonl",
                pool_file=root / "cand_pool" / "local" / pool,
                qrels_file=root / "qrels" / "test" / f"{name}_test_qrels.txt",
                image_root=root,
                global_pool_file=root / MBEIR_GLOBAL_POOL,
                instructions_file=ins,
            )
        )
    return out


def mrbench_tasks(
    mrbench_dir: str | Path,
    image_root: str | Path,
    *,
    global_pool_file: str | Path | None = None,
    instructions_file: str | Path | None = None,
    prefix: str = "mrbench_",
) -> list[TaskSpec]:
    """Every ``query/test/{name}_test.jsonl`` of an MRBench-format directory (sorted by name).

    Task names are ``prefix + name`` without the ``mbeir_`` prefix; K from the M-BEIR table (else 5).
    """
    d = Path(mrbench_dir)
    files = sorted((d / "query" / "test").glob("*_test.jsonl"))
    if not files:
        raise EvalDataError(f"{d / 'query' / 'test'}: no '*_test.jsonl' query files (not an MRBench directory)")
    image_root = Path(image_root)
    ins = Path(instructions_file) if instructions_file else (_instructions(d) or _instructions(image_root))
    gp = Path(global_pool_file) if global_pool_file else None
    if gp is None and (image_root / MBEIR_GLOBAL_POOL).is_file():
        gp = image_root / MBEIR_GLOBAL_POOL
    out = []
    for f in files:
        name = f.name[: -len("_test.jsonl")]
        out.append(
            TaskSpec(
                name=prefix + name.removeprefix("mbeir_"),
                k=mbeir_k(name),
                group="mrbench",
                query_file=f,
                pool_file=d / "cand_pool" / "local" / f"{name}_cand_pool.jsonl",
                qrels_file=d / "qrels" / "test" / f"{name}_test_qrels.txt",
                image_root=image_root,
                global_pool_file=gp,
                instructions_file=ins,
            )
        )
    return out


def bundled_tasks(root: str | Path, *, with_mrbench: bool = True) -> list[TaskSpec]:
    """The bundled multi-grain set: tasks 0, 1, 3, 4, 7 (local pools, K=5) + its MRBench subset."""
    root = Path(root)
    if not (root / "meta" / "summary.json").is_file():
        raise EvalDataError(f"{root}: not a bundled multi-grain dataset (no meta/summary.json)")
    ins = _instructions(root)
    out = []
    for t in BUNDLED_TASK_IDS:
        name = f"mbeir_multigrain_task{t}"
        out.append(
            TaskSpec(
                name=f"multigrain_task{t}",
                k=DEFAULT_K,
                group="bundled",
                query_file=root / "query" / "test" / f"{name}_test.jsonl",
                pool_file=root / "cand_pool" / "local" / f"{name}_cand_pool.jsonl",
                qrels_file=root / "qrels" / "test" / f"{name}_test_qrels.txt",
                image_root=root,
                global_pool_file=root / BUNDLED_GLOBAL_POOL,
                instructions_file=ins,
            )
        )
    if with_mrbench and (root / "mrbench").is_dir():
        out += mrbench_tasks(root / "mrbench", root, global_pool_file=root / BUNDLED_GLOBAL_POOL, instructions_file=ins)
    return out


def zeroshot_task(
    name: str,
    query_file: str | Path,
    pool_file: str | Path,
    qrels_file: str | Path,
    *,
    k: int = DEFAULT_K,
    image_root: str | Path | None = None,
    instructions_file: str | Path | None = None,
) -> TaskSpec:
    """A zero-shot task from any M-BEIR-format triple (image paths relative to ``image_root``, default:
    the query file's directory)."""
    q = Path(query_file)
    return TaskSpec(
        name=name,
        k=int(k),
        group="zeroshot",
        query_file=q,
        pool_file=Path(pool_file),
        qrels_file=Path(qrels_file),
        image_root=Path(image_root) if image_root else q.parent,
        instructions_file=Path(instructions_file) if instructions_file else None,
    )


def parse_task_arg(arg: str, root: str | Path | None = None) -> TaskSpec:
    """``"name:query.jsonl:pool.jsonl:qrels.txt[:K]"`` -> zero-shot TaskSpec (relative paths and images
    resolved against ``root`` when given)."""
    parts = arg.split(":")
    if len(parts) not in (4, 5) or not all(parts):
        raise EvalDataError(f"zero-shot task {arg!r} must look like name:query.jsonl:pool.jsonl:qrels.txt[:K]")
    name, q, p, r = parts[:4]
    try:
        k = int(parts[4]) if len(parts) == 5 else DEFAULT_K
    except ValueError:
        raise EvalDataError(f"zero-shot task {arg!r}: K must be an integer, got {parts[4]!r}") from None
    base = Path(root) if root else None
    res = lambda s: base / s if base is not None and not Path(s).is_absolute() else Path(s)  # noqa: E731
    ins = _instructions(base) if base is not None else None
    return zeroshot_task(name, res(q), res(p), res(r), k=k, image_root=base, instructions_file=ins)


def select_tasks(tasks: list[TaskSpec], names) -> list[TaskSpec]:
    """Keep the tasks named in ``names`` (all when empty); an unknown name is an error listing the valid ones."""
    if not names:
        return tasks
    known = {t.name for t in tasks}
    bad = [n for n in names if n not in known]
    if bad:
        raise EvalDataError(f"unknown task(s) {bad}; this benchmark has: {', '.join(t.name for t in tasks)}")
    return [t for t in tasks if t.name in set(names)]


# ----------------------------------------------------------------------------------------------------
# loading


@dataclasses.dataclass
class LoadedTask:
    """A task ready to score: queries (with qrels), the pool searched, and per-query relevant pool indices."""

    spec: TaskSpec
    queries: list[Query]
    pool: list[Candidate]
    pool_file: Path
    relevant: list[list[int]]
    qrels_without_query: int = 0


def _need(path: Path | None, what: str, task: str) -> Path:
    if path is None or not Path(path).is_file():
        raise EvalDataError(f"task {task}: {what} {path} not found")
    return Path(path)


def _read_pool_cached(path: Path, cache: dict | None) -> tuple[list[Candidate], dict[str, int]]:
    key = str(Path(path).resolve())
    if cache is not None and key in cache:
        return cache[key]
    pool = mbeir.read_pool(path)  # an empty pool raises DataFormatError naming the file
    out = (list(pool.values()), {d: i for i, d in enumerate(pool)})
    if cache is not None:
        cache[key] = out
    return out


def load_task(spec: TaskSpec, *, pool: str = "local", max_queries: int = 0, pool_cache: dict | None = None):
    """Read and validate one task; ``pool`` "local" (the task's) or "global" (the union pool).

    Errors (naming the file): missing files, an empty pool, a qrels did not in the pool, a query without
    any qrels positive, no queries. ``max_queries`` > 0 keeps the first N queries (file order).
    """
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    qf = _need(spec.query_file, "query file", spec.name)
    rf = _need(spec.qrels_file, "qrels file", spec.name)
    if pool == "global":
        if spec.global_pool_file is None:
            raise EvalDataError(f"task {spec.name} ({spec.group}) has no global pool")
        pf = _need(spec.global_pool_file, "global candidate pool", spec.name)
    else:
        pf = _need(spec.pool_file, "candidate pool", spec.name)
    queries = mbeir.read_queries(qf)
    if not queries:
        raise EvalDataError(f"{qf}: no queries")
    cands, index = _read_pool_cached(pf, pool_cache)
    qrels = mbeir.read_qrels(rf)
    for (qid, did), line in qrels.lines.items():
        if did not in index:
            raise DataFormatError(rf, line, f"did {did!r} (positive of qid {qid!r}) is not in the candidate pool {pf}")
    if max_queries > 0:
        queries = queries[:max_queries]
    relevant = []
    for q in queries:
        pos = qrels.positives.get(q.qid)
        if not pos:
            raise EvalDataError(f"{qf}: query {q.qid!r} has no positive in {rf}")
        relevant.append([index[d] for d in pos])
    qids = {q.qid for q in mbeir.read_queries(qf)} if max_queries > 0 else {q.qid for q in queries}
    extra = sum(1 for q in qrels.positives if q not in qids)
    return LoadedTask(spec, queries, cands, pf, relevant, qrels_without_query=extra)


# ----------------------------------------------------------------------------------------------------
# records and instructions


@dataclasses.dataclass(frozen=True)
class InstructionRule:
    """How each query's instruction is chosen (see the module docstring). enabled=False: none."""

    enabled: bool = True
    seed: int | None = None
    fixed_index: int | None = None

    def describe(self) -> str:
        if not self.enabled:
            return "none (queries without instructions)"
        if self.fixed_index is not None:
            return f"fixed: prompt index {self.fixed_index} of each (dataset, query modality, candidate modality) entry"
        if self.seed is None:
            return "crc32(qid) % n_prompts (choose_instruction; the training pipeline's rule)"
        return f"blake2b('{self.seed}:' + qid) % n_prompts (choose_instruction with seed {self.seed})"


def query_records(
    task: LoadedTask, instructions: dict[str, tuple[str, ...]] | None, rule: InstructionRule
) -> tuple[list[dict], dict]:
    """Query records ``{"id", "item"}`` with their instructions, and a summary of the choices made
    (``{"rule", "with_instruction", "without_instruction", "prompt_counts"}``)."""
    recs, counts, missing = [], Counter(), 0
    root = task.spec.image_root
    for q, rel in zip(task.queries, task.relevant):
        instr = None
        if rule.enabled and instructions:
            cmod = task.pool[rel[0]].modality
            prompts = instructions.get(mbeir.instruction_key(q.dataset_id, q.query_modality, cmod))
            if prompts:
                instr = choose_instruction(prompts, q.qid, seed=rule.seed, fixed_index=rule.fixed_index)
                counts[prompts.index(instr)] += 1
        missing += instr is None
        img = str(mbeir.resolve_image_path(root, q.query_img_path)) if q.query_img_path else None
        recs.append({"id": q.qid, "item": {"text": q.query_txt, "image": img, "instruction": instr}})
    summary = {
        "rule": rule.describe(),
        "with_instruction": len(recs) - missing,
        "without_instruction": missing,
        "prompt_counts": {str(k): v for k, v in sorted(counts.items())},
    }
    return recs, summary


def candidate_records(task: LoadedTask) -> list[dict]:
    """Pool records ``{"id", "item"}`` (no instruction), in pool order."""
    return corpus_records(task.pool, task.spec.image_root)


# ----------------------------------------------------------------------------------------------------
# grain annotations (grain-masking analysis)


def read_grains(path: str | Path) -> dict[str, list[dict]]:
    """Grain phrases per qid: ``{qid: [{"phrase", "kind", "span"}]}``.

    Accepts the bundled ``meta/query_grains.jsonl`` (entries whose ``text_field`` is not "query_txt"
    annotate a caption, not the query text, and are skipped; spans index ``text``) and plain
    ``{"qid", "phrases": [str, ...]}`` lines (kind and span None: the phrase is searched in the text).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"grain annotations {path} not found")
    out: dict[str, list[dict]] = {}
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, f"malformed JSON ({e.msg})") from e
        if not isinstance(r, dict) or "qid" not in r:
            raise DataFormatError(path, lineno, "expected an object with 'qid'")
        if "grains" in r:
            if r.get("text_field", "query_txt") != "query_txt":
                continue
            items = [
                {"phrase": g["phrase"], "kind": g.get("kind"), "span": g.get("span"), "text": r.get("text")}
                for g in r["grains"]
            ]
        elif "phrases" in r:
            if not isinstance(r["phrases"], list) or not all(isinstance(p, str) for p in r["phrases"]):
                raise DataFormatError(path, lineno, "'phrases' must be a list of strings")
            items = [{"phrase": p, "kind": None, "span": None, "text": None} for p in r["phrases"]]
        else:
            raise DataFormatError(path, lineno, "expected 'grains' (bundled format) or 'phrases'")
        out[str(r["qid"])] = items
    return out


def mask_phrase(text: str, grain: dict) -> str | None:
    """``text`` with one grain phrase removed (its span when it matches, else the first occurrence);
    whitespace collapsed and spaces before punctuation dropped. None when the phrase is not in ``text``
    or nothing would be left."""
    phrase, span = grain["phrase"], grain.get("span")
    if span and grain.get("text") == text and text[span[0] : span[1]] == phrase:
        s, e = span
    else:
        s = text.find(phrase)
        if s < 0 or not phrase:
            return None
        e = s + len(phrase)
    out = re.sub(r"\s+", " ", text[:s] + " " + text[e:])
    out = re.sub(r"\s+([,.:;!?])", r"\1", out).strip()
    return out or None
