"""Where a benchmark's tasks come from: the task specs of ``eval.benchmark`` (bundled, mbeir, mrbench,
zeroshot; :mod:`elva_jax.eval.tasks`) and their data roots, with the bundled sets generated when absent
(the multi-grain set, and the MMEB-format set of ``eval.benchmark=mmeb``)."""

from __future__ import annotations

from pathlib import Path

from elva_jax.data.benchmarks.mmeb.bundled import generate as generate_mmeb_bundled
from elva_jax.data.benchmarks.multigrain.generator import ensure_generated
from elva_jax.eval import tasks as T
from elva_jax.schema import RunConfig

__all__ = ["benchmark_tasks", "mmeb_root"]


def _bundled_root(cfg: RunConfig, run_dir: Path | None) -> Path:
    e = cfg.eval
    if e.data_root:
        return Path(e.data_root)
    if cfg.data.kind == "bundled" and cfg.data.root:
        return Path(cfg.data.root)
    if run_dir is not None and (run_dir / "bundled_data" / "meta" / "summary.json").is_file():
        return run_dir / "bundled_data"
    d = cfg.data
    return ensure_generated(
        Path(cfg.run.dir) / "bundled_data", n_train=d.bundled_train_scenes, n_test=d.bundled_test_scenes
    )


def mmeb_root(cfg: RunConfig, run_dir: Path | None) -> Path:
    """--data / eval.data_root, else the run's bundled MMEB-format set (generated when absent)."""
    if cfg.eval.data_root:
        return Path(cfg.eval.data_root)
    for root in ([run_dir / "mmeb_bundled"] if run_dir is not None else []) + [Path(cfg.run.dir) / "mmeb_bundled"]:
        if (root / "mmeb_tasks.json").is_file():
            return root
    root = Path(cfg.run.dir) / "mmeb_bundled"
    generate_mmeb_bundled(root, seed=0, overwrite=True)
    return root


def benchmark_tasks(cfg: RunConfig, run_dir: Path | None = None) -> tuple[list[T.TaskSpec], Path | None]:
    """(task specs, data root) of ``cfg.eval.benchmark`` filtered by ``eval.tasks``."""
    e = cfg.eval
    root: Path | None
    if e.benchmark == "bundled":
        root = _bundled_root(cfg, run_dir)
        specs = T.bundled_tasks(root)
    elif e.benchmark == "mbeir":
        root = Path(e.data_root or cfg.data.root) if (e.data_root or cfg.data.root) else None
        if root is None or not root.is_dir():
            raise T.EvalDataError(f"M-BEIR root {root} not found: set data.root=... or eval.data_root=...")
        specs = T.mbeir_tasks(root)
    elif e.benchmark == "mrbench":
        if e.data_root or cfg.data.root:
            root = Path(e.data_root or cfg.data.root)
        else:
            root = _bundled_root(cfg, run_dir)
        mdir = Path(e.mrbench_dir) if e.mrbench_dir else root / "mrbench"
        specs = T.mrbench_tasks(mdir, Path(e.image_root) if e.image_root else root)
    else:
        root = Path(e.data_root or cfg.data.root) if (e.data_root or cfg.data.root) else None
        if not e.zeroshot_tasks:
            raise T.EvalDataError("benchmark zeroshot needs eval.zeroshot_tasks (or --task name:query:pool:qrels[:K])")
        specs = [T.parse_task_arg(a, root) for a in e.zeroshot_tasks]
    return T.select_tasks(specs, e.tasks), root
