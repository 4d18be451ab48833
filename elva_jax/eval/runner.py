"""End-to-end evaluation: checkpoint -> embeddings (cached) -> exact top-k -> Recall@K / MRR -> reports.
(``eval.benchmark=mmeb``: MMEB-V2 scoring and reports of :mod:`elva_jax.eval.mmeb`.)

``evaluate(cfg, ...)`` is what ``python -m elva_jax.eval`` and the end of a training run call. The
config is a training preset (``configs/*.yaml``: model, data, mesh ... sections) plus an ``eval``
section (:class:`EvalSection`), so ``eval.mode=ret`` or ``data.root=/data/M-BEIR`` are overrides.
``eval.mode=instruct_last`` embeds the Qwen3-VL-Embedding way (query instruction as the system turn,
``data.default_instruction`` for candidates; :mod:`elva_jax.eval.embed`).

The steps, each in its module: the checkpoint and the embedding mode (:mod:`elva_jax.eval.checkpoints`);
the benchmark's tasks, every one read and checked before the model loads (:mod:`elva_jax.eval.benchmarks`,
:mod:`elva_jax.eval.tasks`); the embedder (:class:`elva_jax.eval.embed.Embedder`, cache under
``{cache_dir}/{fingerprint[:12]}/``; with ``eval.cot_reasoner`` a T-CoT generator, :mod:`elva_jax.eval.cot`);
Recall@K / MRR per task and their averages (:mod:`elva_jax.eval.recall`); grain masking
(``eval.grain_masking``, :mod:`elva_jax.eval.grain`); the reports in the out directory, ``results.json``,
``results.md`` and ``recall.png`` (:mod:`elva_jax.eval.reports`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from elva_jax import configlib
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.tokenize import generation_vocab
from elva_jax.eval import mmeb as M
from elva_jax.eval import tasks as T
from elva_jax.eval.benchmarks import benchmark_tasks, mmeb_root
from elva_jax.eval.checkpoints import checkpoint_identity, load_model, resolve_checkpoint, resolve_mode
from elva_jax.eval.cot import CoTGenerator, cot_config
from elva_jax.eval.embed import Embedder
from elva_jax.eval.embed_config import EmbedConfig
from elva_jax.eval.grain import grain_masking, grains_file
from elva_jax.eval.recall import averages, score_tasks
from elva_jax.eval.reports import pct, read_before, write_reports
from elva_jax.model.config import ModelOptions
from elva_jax.parallel.sharding import make_mesh
from elva_jax.schema import EvalSection, RunConfig, project

# resolve_checkpoint (eval.checkpoints) and write_reports (eval.reports) are re-exported
__all__ = ["EvalConfig", "EvalSection", "evaluate", "load_config", "resolve_checkpoint", "write_reports"]


EvalConfig = RunConfig  # a training preset's sections, `eval` among them


# EmbedConfig fields that the run's data section sets besides its media settings (the rest come from the eval
# section)
_FROM_DATA = ("seq_buckets", "patch_rows", "default_instruction")


def default_config_path() -> str | None:
    p = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    return str(p) if p.exists() else None


def load_config(cfg=None, overrides=()) -> EvalConfig:
    """EvalConfig from None (the tiny CPU preset), a YAML path, a dict, a RunConfig or an EvalConfig,
    with ``key.sub=value`` overrides applied on top."""
    overrides = list(overrides)
    if cfg is None or isinstance(cfg, str | os.PathLike):
        return configlib.load(EvalConfig, str(cfg) if cfg is not None else default_config_path(), overrides)
    if isinstance(cfg, RunConfig):
        data = configlib.to_dict(cfg)
    elif isinstance(cfg, dict):
        data = cfg
    else:
        raise TypeError(f"cannot build an EvalConfig from {type(cfg).__name__}")
    return configlib.from_dict(EvalConfig, configlib.apply_overrides(data, overrides))


# ----------------------------------------------------------------------------------------------------
# the steps before anything is embedded


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the evaluated model comes from: its transformers dir (None for in-memory params), the run dir
    and step when the checkpoint is a run's export, and how results.json names it."""

    model_dir: Path | None
    run_dir: Path | None
    step: int | None
    checkpoint: str


def _source(cfg: EvalConfig, checkpoint: str | None, params, model_cfg, tokenizer) -> _Source:
    """The model's source: ``checkpoint`` (or ``model.checkpoint``) resolved, or the in-memory params."""
    ckpt = checkpoint or cfg.model.checkpoint
    if params is None:
        if not ckpt:
            raise configlib.ConfigError("no checkpoint: pass --checkpoint DIR_OR_RUN (or model.checkpoint=...)")
        model_dir, run_dir, step = resolve_checkpoint(ckpt)
        return _Source(model_dir, run_dir, step, str(model_dir))
    if model_cfg is None or tokenizer is None:
        raise ValueError("in-memory params need model_cfg and tokenizer")
    return _Source(None, None, None, str(ckpt or "<in-memory>"))


def _embedding_mode(cfg: EvalConfig, src: _Source, log) -> tuple[EvalConfig, str, str]:
    """(cfg with ``eval.mode`` resolved, the mode's name in the outputs, why it was chosen): Embed-RL's
    layout with ``eval.cot_reasoner`` (named "tcot"), else ``eval.mode`` or, for "auto", the export record."""
    e = cfg.eval
    if e.cot_reasoner:  # Embed-RL's embedder layout: the side + its T-CoT, hidden state at <emb>
        resolve_checkpoint(e.cot_reasoner)  # a wrong reasoner path fails before any model loads
        mode, mode_source = "eol", "--cot: Embed-RL's embedder layout (side + T-CoT + summarise request, <emb>)"
        if e.mode not in ("auto", "eol"):
            log(f"[elva_jax.eval] --mode {e.mode} is not used with --cot")
    else:
        mode, mode_source = resolve_mode(e.mode, src.model_dir)
    if mode != e.mode:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(e, mode=mode))
    mode_name = "tcot" if e.cot_reasoner else mode
    log(f"[elva_jax.eval] embedding mode {mode_name} ({mode_source})")
    return cfg, mode_name, mode_source


def _out_dir(cfg: EvalConfig, run_dir: Path | None, mode_name: str) -> Path:
    """``eval.out``, else ``{run dir or run.dir}/eval/{benchmark}-{mode}-{pool}``."""
    e = cfg.eval
    base = run_dir if run_dir is not None else Path(cfg.run.dir)
    return Path(e.out) if e.out else base / "eval" / f"{e.benchmark}-{mode_name}-{e.pool}"


def _read_tasks(cfg: EvalConfig, run_dir: Path | None, out: Path, log) -> tuple[Path | None, list, list | None]:
    """(data root, loaded retrieval tasks, MMEB tasks or None): every task read and validated, so data errors
    surface before the model loads."""
    e = cfg.eval
    mtasks = None
    if e.benchmark == "mmeb":
        if e.compare_to:
            raise T.EvalDataError("--compare-to is not available with --benchmark mmeb")
        if e.grain_masking:  # on in the tiny preset; MMEB has no grain annotations
            log("[elva_jax.eval] grain masking does not apply to MMEB: not run")
        root = mmeb_root(cfg, run_dir)
        mtasks = M.load_tasks(root, e.tasks, materialize_dir=out / "mmeb_images", max_queries=e.max_queries)
        loaded = []
    else:
        specs, root = benchmark_tasks(cfg, run_dir)
        pool_cache: dict = {}
        loaded = [T.load_task(s, pool=e.pool, max_queries=e.max_queries, pool_cache=pool_cache) for s in specs]
    if e.compare_to and not Path(e.compare_to).is_file():
        raise FileNotFoundError(f"--compare-to {e.compare_to}: file not found")
    return root, loaded, mtasks


def _cot_generator(cfg: EvalConfig, opts, cache_policy: str, out: Path, mesh, log) -> CoTGenerator:
    """The T-CoT generator of ``eval.cot_reasoner`` (`elva_jax.eval.cot`); its cache under
    ``{cache_dir or out/cache}/cot/{fingerprint[:12]}`` (a temporary directory with ``cache=none``)."""
    rdir, _, rstep = resolve_checkpoint(cfg.eval.cot_reasoner)
    rcfg, rparams, rtok = load_model(cfg, rdir)
    root = None
    if cache_policy != "none":
        root = (Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else out / "cache") / "cot"
    gen = CoTGenerator(
        rparams, rcfg, rtok, cot_config(cfg), opts=opts, identity=checkpoint_identity(rdir, rstep), cache_root=root,
        mesh=mesh, log=log,
    )  # fmt: skip
    log(f"[elva_jax.eval] T-CoTs by the reasoner {rdir} ({rcfg.text.num_layers}-layer); cache {gen.dir}")
    return gen


def _embedder(cfg: EvalConfig, model_cfg, params, tok, identity, cache_policy: str, out: Path, log) -> Embedder:
    """The embedder of the eval section's embedding fields and the data section's shapes, pixel limits and
    instruction, over all local devices (a mesh when there are several), with its T-CoT generator when
    ``eval.cot_reasoner`` is set."""
    e, m = cfg.eval, cfg.model
    opts = ModelOptions(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        position_mode=m.position_mode,
        vocab=generation_vocab(tok, m.generation_words),  # what [RET] summaries may use
    )
    tcot = cfg.embed_rl.summarise_instruction if e.cot_reasoner else ""
    data = {k: getattr(cfg.data, k) for k in _FROM_DATA}
    ecfg = project(EmbedConfig, e, **data, media=project(MediaSettings, cfg.data), tcot_request=tcot)
    mesh = None
    if jax.local_device_count() > 1:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
    cot = None
    if e.cot_reasoner:
        cot = _cot_generator(cfg, opts, cache_policy, out, mesh, log)
    return Embedder(params, model_cfg, tok, ecfg, opts=opts, identity=identity, mesh=mesh, log=log, cot=cot)


# ----------------------------------------------------------------------------------------------------
# evaluation


@dataclasses.dataclass(frozen=True)
class _Session:
    """One evaluation once set up: its config (``eval.mode`` resolved), the embedder, the cache arguments of
    every ``embed`` call, results.json's settings, the out directory and whether this process writes there."""

    cfg: EvalConfig
    embedder: Embedder
    emb_kw: dict
    settings: dict
    out: Path
    writer: bool
    log: Callable[[str], None]
    t_start: float


def _settings(cfg: EvalConfig, src: _Source, mode: tuple[str, str], embedder: Embedder, root, cache_dir) -> dict:
    """results.json's "settings": what was evaluated, how it was embedded (``mode`` = (name, why)) and ranked."""
    e = cfg.eval
    settings = {
        "benchmark": e.benchmark,
        "mode": mode[0],
        "mode_source": mode[1],
        "embedding": embedder.ecfg.describe(),
        "pool": e.pool,
        "instruction_rule": _instruction_rule(e).describe(),
        "checkpoint": src.checkpoint,
        "run_dir": str(src.run_dir) if src.run_dir else None,
        "step": src.step,
        "data_root": str(root) if root else None,
        "recall_ks": list(e.recall_ks),
        "topk": e.topk,
        "tie_order": e.tie_order,
        "max_queries": e.max_queries,
        "dtype": cfg.model.dtype,
        "position_mode": cfg.model.position_mode,
        "devices": jax.local_device_count(),
        "fingerprint_sha": embedder.fingerprint_sha,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
    }
    cot = embedder.cot
    if cot is not None:
        settings["cot"] = {"reasoner": e.cot_reasoner, "cache_dir": str(cot.dir), **cot.describe()}
    return settings


def _instruction_rule(e) -> T.InstructionRule:
    return T.InstructionRule(e.instructions, e.instruction_seed, e.instruction_index)


def _evaluate_mmeb(s: _Session, mtasks: list) -> dict:
    """MMEB-V2: every task embedded and scored (:mod:`elva_jax.eval.mmeb`), its reports written."""
    results = M.evaluate_tasks(mtasks, s.embedder, s.emb_kw, log=s.log)
    results = {"settings": s.settings, **results}
    if s.embedder.cot is not None:
        results["cot"] = s.embedder.cot.summary()
    results["settings"]["instruction_rule"] = "MMEB: each record's own instruction (qry_inst / tgt_inst)"
    results["timing"]["total_s"] = time.perf_counter() - s.t_start
    results["files"] = M.write_reports(results, s.out) if s.writer else {}
    a = results["averages"]["all"]
    s.log(f"[elva_jax.eval] MMEB overall {pct(a['score'])} over {a['n_tasks']} scored tasks; {s.out}")
    return results


def _evaluate_retrieval(s: _Session, loaded: list, root: Path | None) -> dict:
    """The retrieval benchmarks: Recall@K / MRR per task and their averages (:mod:`elva_jax.eval.recall`),
    grain masking when asked for, the reports (before/after with ``eval.compare_to``)."""
    e = s.cfg.eval
    mesh = s.embedder.mesh
    scores = score_tasks(loaded, s.embedder, s.emb_kw, _instruction_rule(e), e, mesh, s.log)
    t_embed = scores.embed_s
    results: dict[str, Any] = {"settings": s.settings, "tasks": scores.tasks, "averages": averages(scores.tasks)}
    if e.grain_masking:
        gpath, qrecs = grains_file(e, root), scores.query_records
        t0 = time.perf_counter()
        results["grain_masking"] = grain_masking(s.cfg, loaded, qrecs, s.embedder, s.emb_kw, gpath, s.log)
        t_embed += time.perf_counter() - t0
    results["embedding"] = s.embedder.stats
    if s.embedder.cot is not None:
        results["cot"] = s.embedder.cot.summary()
    results["timing"] = {"embed_s": t_embed, "topk_s": scores.topk_s, "total_s": time.perf_counter() - s.t_start}
    before = None
    if e.compare_to:
        before = read_before(e.compare_to)
        results["compare_to"] = str(Path(e.compare_to))
    results["files"] = write_reports(results, s.out, before) if s.writer else {}
    st = s.settings
    s.log(
        f"[elva_jax.eval] average R@K {100 * results['averages']['all']['recall_at_k']:.1f} over "
        f"{len(scores.tasks)} tasks ({st['mode']} embedding, {st['mode_source']}); {s.out}"
    )
    return results


def evaluate(
    cfg=None,
    *,
    overrides=(),
    checkpoint: str | None = None,
    params: dict | None = None,
    model_cfg=None,
    tokenizer=None,
    identity: dict | None = None,
    log=None,
) -> dict:
    """Run one evaluation and write results.json / results.md / recall.png; returns the results dict.

    cfg: EvalConfig, RunConfig (a training run's), dict, YAML path or None (tiny CPU preset); overrides
    ``key.sub=value`` apply on top. checkpoint: a transformers dir or a run dir (its ``export/``; default
    ``model.checkpoint``). In-memory ``params`` + ``model_cfg`` + ``tokenizer`` skip loading; then
    ``identity`` (e.g. ``{"run": dir, "step": n}``) names them for the cache (no identity: no cache).
    """
    t_start = time.perf_counter()
    cfg = load_config(cfg, overrides)
    log = log or (lambda s: print(s, flush=True))
    src = _source(cfg, checkpoint, params, model_cfg, tokenizer)
    cfg, mode_name, mode_source = _embedding_mode(cfg, src, log)
    e = cfg.eval
    out = _out_dir(cfg, src.run_dir, mode_name)
    root, loaded, mtasks = _read_tasks(cfg, src.run_dir, out, log)
    cache_policy = e.cache
    if params is None:
        model_cfg, params, tokenizer = load_model(cfg, src.model_dir)
        identity = checkpoint_identity(src.model_dir, src.step)
    elif identity is None:
        cache_policy = "none"
        log("[elva_jax.eval] in-memory params without an identity: embedding cache disabled (eval.cache=none)")
    writer = jax.process_index() == 0  # multi-process: every process evaluates, process 0 writes files
    if not writer:
        cache_policy = "none"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    embedder = _embedder(cfg, model_cfg, params, tokenizer, identity, cache_policy, out, log)
    cache_root = (Path(e.cache_dir) if e.cache_dir else out / "cache") / embedder.fingerprint_sha[:12]
    cache_dir = None if cache_policy == "none" else cache_root
    settings = _settings(cfg, src, (mode_name, mode_source), embedder, root, cache_dir)
    emb_kw = {"cache_dir": cache_dir, "cache": cache_policy}
    s = _Session(cfg, embedder, emb_kw, settings, out, writer, log, t_start)
    if e.benchmark == "mmeb":
        return _evaluate_mmeb(s, mtasks)
    return _evaluate_retrieval(s, loaded, root)
