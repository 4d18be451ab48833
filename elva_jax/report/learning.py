"""Does the whole stack learn? Runs one config over several seeds and reports the learning evidence.

    python -m elva_jax.report.learning --config configs/tiny_learn.yaml --out runs/tiny_learn \\
        [--seeds 0 1 2] [--variant soft_rank:rl.aux_soft_rank_weight=1.0 ...] [--variant-seeds 0]

Each run is the main command, ``python -m elva_jax.train --config C run.dir=OUT/{name}seed{s}
train.seed={s}``, in its own process (the model's random init follows ``train.seed``; the bundled
data, and so the test set, stay the same). A finished run (see `finished`) is reused; an unfinished
one is continued by the same command (the run resumes from its checkpoints).
From the runs' ``summary.json`` / ``metrics.jsonl`` / ``rl/metrics.jsonl`` and eval results it writes:

- ``summary.json``: per run and aggregated: test R@1 / R@5 of the bundled tasks (mean over tasks)
  at the start, after the contrastive stage and after RL, in each evaluated embedding mode, with the
  chance level (K / candidates per task, averaged); grain sensitivity (grain masking) before / after
  RL; the RL mean reward per step and its least-squares slope per run, and over the seeds the mean
  slope with its 95 % Student-t interval (``mean +- t_{0.975, n-1} * sd / sqrt(n)``); the targets.
- ``curves.png``: training loss, RL mean reward and its components per step, recall per stage.
- ``report.md``: the same numbers as tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from elva_jax.errors import UserError, cli
from elva_jax.report.plot import learning_curves

#: two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..10
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
#: the learning targets: contrastive test R@1 at least this many times chance
R1_TARGET_X_CHANCE = 3.0


class ReportError(UserError, RuntimeError):
    """A run of the report failed or left no results."""


def slope(y, x=None) -> float:
    """Least-squares slope of ``y`` against ``x`` (default: its index 1..n, i.e. per step); nan for fewer
    than 2 points."""
    y = np.asarray(y, np.float64)
    if len(y) < 2:
        return float("nan")
    x = np.arange(1, len(y) + 1, dtype=np.float64) if x is None else np.asarray(x, np.float64)
    x = x - x.mean()
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean of ``values`` (n >= 2)."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if n < 2:
        return (float(v.mean()) if n else float("nan"), float("nan"), float("nan"))
    half = _T975[min(n - 1, len(_T975)) - 1] * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def recall_summary(results_json: str | Path, group: str = "bundled") -> dict:
    """Mean over the ``group`` tasks of R@1 and R@5, their chance levels (K / candidates; one positive
    per query in the bundled set) and the grain masking distance, from an eval ``results.json``."""
    r = json.loads(Path(results_json).read_text())
    tasks = [t for t in r["tasks"].values() if t["group"] == group]
    if not tasks:
        raise ReportError(f"{results_json}: no task of group {group!r}")
    out = {"mode": r["settings"]["mode"], "n_tasks": len(tasks)}
    for k in (1, 5):
        out[f"r{k}"] = float(np.mean([t["recall"][str(k)] for t in tasks]))
        out[f"chance_r{k}"] = float(np.mean([min(1.0, k / t["n_candidates"]) for t in tasks]))
    out["per_task_r1"] = {n: t["recall"]["1"] for n, t in r["tasks"].items() if t["group"] == group}
    gm = r.get("grain_masking") or {}
    out["grain_masking"] = gm.get("mean_cosine_distance")
    return out


def split_overrides(text: str) -> list[str]:
    """``"a=1,b=[x,y]"`` -> ``["a=1", "b=[x,y]"]``: commas inside brackets belong to a list value."""
    return [part for part in re.split(r",(?![^\[]*\])", text) if part]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect(run_dir: str | Path) -> dict:
    """The learning evidence of one finished run directory."""
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    rl_all = _jsonl(run_dir / "rl" / "metrics.jsonl")
    rl_rows = [r for r in rl_all if "reward" in r]
    probe_rows = [r for r in rl_all if "probe_reward" in r]
    sft_rows = [r for r in _jsonl(run_dir / "sft" / "metrics.jsonl") if "loss" in r]
    # the contrastive loss every run.log_every steps: metrics.jsonl keeps every invocation's, summary.json's
    # per-step "losses" only the last invocation's (none when a rerun found the stage complete)
    loss_rows = [r for r in _jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    evals = {}
    for when in ("start", "before_rl", "final"):
        for mode in ("eol", "ret", "instruct_last"):
            p = run_dir / "eval" / f"{when}-{mode}" / "results.json"
            if p.is_file():
                evals[f"{when}-{mode}"] = recall_summary(p)
    rewards = [r["reward"] for r in rl_rows]
    # ELVA's reward parts (margin, ranking) or Embed-RL's (format, ORM); whichever the run logged
    parts = {k: f"reward_{k}" for k in ("margin", "ranking")} | {k: k for k in ("format", "orm")}
    # the policy on the held-out probe set with a fixed sampling key (rl.probe_instances), per probe step:
    # every probe_* number the run logged (ELVA: reward, margin, ranking, top1; Embed-RL: reward, format, orm, acc)
    probe_keys = sorted({k[6:] for r in probe_rows for k in r if k.startswith("probe_") and k != "probe_s"})
    probe_steps = [r["step"] for r in probe_rows]
    return {
        "run_dir": str(run_dir),
        "wall_s": s.get("wall_s"),
        "loss": s.get("losses", []),
        "loss_curve": {"step": [r["step"] for r in loss_rows], "loss": [r["loss"] for r in loss_rows]},
        "rl": {
            "reward": rewards,
            **{k: [r[col] for r in rl_rows] for k, col in parts.items() if rl_rows and col in rl_rows[0]},
            "kl": [r.get("kl_mean") for r in rl_rows],
            "summary_len": [r.get("summary_len", r.get("cot_len")) for r in rl_rows],
            "slope": slope(rewards),
        },
        "probe": {
            "step": probe_steps,
            **{k: [r[f"probe_{k}"] for r in probe_rows] for k in probe_keys},
            "slope": slope([r["probe_reward"] for r in probe_rows], probe_steps),
            "slopes": {k: slope([r[f"probe_{k}"] for r in probe_rows], probe_steps) for k in probe_keys},
        },
        "sft": {"step": [r["step"] for r in sft_rows], "loss": [r["loss"] for r in sft_rows]},
        "eval": evals,
    }


def finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a completed run: the run's final summary.json (the contrastive loop writes
    an earlier one; a time-boxed or preempted run records ``stopped``)."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        return False
    try:
        s = json.loads(p.read_text())
    except ValueError:
        return False
    return "wall_s" in s and "export" in s and "stopped" not in s


def _run(config: str, run_dir: Path, seed: int, overrides: list[str], log) -> float:
    if finished(run_dir):
        log(f"{run_dir}: finished earlier, reused")
        return 0.0
    cmd = [sys.executable, "-m", "elva_jax.train", "--config", config, f"run.dir={run_dir}", f"train.seed={seed}"]
    cmd += overrides
    log(" ".join(cmd))
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0 or not finished(run_dir):
        tail = (run_dir / "train.log").read_text().splitlines()[-5:]
        raise ReportError(f"{run_dir}: the run failed (exit {rc}); last lines of its train.log:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def aggregate(runs: list[dict]) -> dict:
    """Over the seeds: mean / min / max of every recall number, the reward slope interval."""
    out: dict = {"n": len(runs)}
    stage = {"start": 0, "before_rl": 1, "final": 2}
    keys = sorted({k for r in runs for k in r["eval"]}, key=lambda k: (stage.get(k.split("-")[0], 9), k))
    for k in keys:
        have = [r["eval"][k] for r in runs if k in r["eval"]]
        out[k] = {}
        for f in ("r1", "r5", "chance_r1", "chance_r5", "grain_masking"):
            vals = [h[f] for h in have if h.get(f) is not None]
            if vals:
                out[k][f] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
    slopes = [r["rl"]["slope"] for r in runs if not math.isnan(r["rl"]["slope"])]
    if slopes:
        m, lo, hi = t_interval(slopes)
        out["reward_slope"] = {"per_seed": slopes, "mean": m, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}
        firsts = [np.mean(r["rl"]["reward"][:5]) for r in runs if r["rl"]["reward"]]
        lasts = [np.mean(r["rl"]["reward"][-5:]) for r in runs if r["rl"]["reward"]]
        out["reward_first5_last5"] = [float(np.mean(firsts)), float(np.mean(lasts))]
    probes = [r["probe"] for r in runs if r.get("probe", {}).get("reward")]
    pslopes = [p["slope"] for p in probes if not math.isnan(p["slope"])]
    if pslopes:
        m, lo, hi = t_interval(pslopes)
        out["probe_slope"] = {"per_seed": pslopes, "mean": m, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}
        n = min(len(p["step"]) for p in probes)
        cols = np.array([p["reward"][:n] for p in probes])
        band = [t_interval(cols[:, j]) for j in range(n)]
        out["probe_curve"] = {"step": probes[0]["step"][:n], **dict(zip(("mean", "lo", "hi"), map(list, zip(*band))))}
        for k in sorted(set.intersection(*(set(p.get("slopes", {})) for p in probes))):
            out[f"probe_{k}_first_last"] = [
                float(np.mean([p[k][0] for p in probes])),
                float(np.mean([p[k][-1] for p in probes])),
            ]
            m, lo, hi = t_interval([p["slopes"][k] for p in probes])
            out.setdefault("probe_slopes", {})[k] = {"mean": m, "ci95": [lo, hi]}
    paired = [r for r in runs if "before_rl-ret" in r["eval"] and "final-ret" in r["eval"]]
    if paired:
        out["ret_after_minus_before"] = {
            f: [r["eval"]["final-ret"][f] - r["eval"]["before_rl-ret"][f] for r in paired] for f in ("r1", "r5")
        }
    return out


def targets(agg: dict) -> dict:
    """The learning targets, evaluated on the aggregate of the main variant."""
    t: dict = {}
    c = agg.get("before_rl-eol") or agg.get("final-eol")
    if c:
        ratio = c["r1"]["mean"] / c["chance_r1"]["mean"]
        t["contrastive_r1_x_chance"] = {
            "value": ratio,
            "target": R1_TARGET_X_CHANCE,
            "met": ratio >= R1_TARGET_X_CHANCE,
        }
    if "reward_slope" in agg:
        rs = agg["reward_slope"]
        t["rl_reward_slope"] = {"ci95": rs["ci95"], "met": bool(rs["ci95"][0] > 0)}
    if "probe_slope" in agg:  # the policy's expected reward on held-out instances rises
        ps = agg["probe_slope"]
        t["rl_probe_reward_slope"] = {"ci95": ps["ci95"], "met": bool(ps["ci95"][0] > 0)}
    for k in ("format", "orm"):  # Embed-RL: the reasoner's format-valid rate and the embedder's ORM on the probe
        if k in agg.get("probe_slopes", {}):
            ci = agg["probe_slopes"][k]["ci95"]
            t[f"embed_rl_probe_{k}_slope"] = {"ci95": ci, "met": bool(ci[0] > 0)}
    if "ret_after_minus_before" in agg:  # held-out [RET] recall after RL beats before, on the mean of paired seeds
        d = agg["ret_after_minus_before"]
        for f in ("r1", "r5"):
            t[f"rl_ret_{f}_gain"] = {"per_seed": d[f], "mean": float(np.mean(d[f])), "met": bool(np.mean(d[f]) > 0)}
    return t


def _machine() -> dict:
    try:
        info = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        info = []
    flags = next((line for line in info if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "avx512": "avx512f" in flags}


def _fmt(x, pct=True) -> str:
    return "–" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.4f}")


def markdown(report: dict) -> str:
    lines = [f"# Learning report: {report['config']}", "", f"Machine: {report['machine']}", ""]
    for name, v in report["variants"].items():
        agg = v["aggregate"]
        lines += [f"## {name} ({agg['n']} seeds: {v['seeds']}; overrides: {v['overrides'] or 'none'})", ""]
        evals = [(k, e) for k, e in agg.items() if isinstance(e, dict) and isinstance(e.get("r1"), dict)]
        if evals:  # (Embed-RL's runs evaluate no embedder of their own)
            lines += ["| evaluation | R@1 mean (min-max) | R@5 mean (min-max) | chance R@1 / R@5 | grain masking |"]
            lines += ["|---|---|---|---|---|"]
        for k, e in evals:
            gm = e.get("grain_masking", {}).get("mean")
            lines.append(
                f"| {k} | {_fmt(e['r1']['mean'])} ({_fmt(e['r1']['min'])}-{_fmt(e['r1']['max'])}) | "
                f"{_fmt(e['r5']['mean'])} ({_fmt(e['r5']['min'])}-{_fmt(e['r5']['max'])}) | "
                f"{_fmt(e['chance_r1']['mean'])} / {_fmt(e['chance_r5']['mean'])} | {_fmt(gm, pct=False)} |"
            )
        if "reward_slope" in agg:
            rs = agg["reward_slope"]
            f5, l5 = agg["reward_first5_last5"]
            lines += [
                "",
                f"RL mean reward: first 5 steps {f5:.4f}, last 5 steps {l5:.4f}; slope per step "
                f"{rs['mean']:.2e}, 95 % t-interval over seeds [{rs['ci95'][0]:.2e}, {rs['ci95'][1]:.2e}] "
                f"(per seed: {', '.join(f'{x:.2e}' for x in rs['per_seed'])})",
            ]
        if "probe_slopes" in agg:
            lines += ["", "Probe (held-out instances, fixed sampling key), mean over seeds:", ""]
            lines += ["| probe | first | last | slope per step | 95 % t-interval over seeds |", "|---|---|---|---|---|"]
            for k, sl in agg["probe_slopes"].items():
                f0, f1 = agg[f"probe_{k}_first_last"]
                lo, hi = sl["ci95"]
                lines.append(f"| {k} | {f0:.4f} | {f1:.4f} | {sl['mean']:.2e} | [{lo:.2e}, {hi:.2e}] |")
        lines.append("")
    lines += equal_compute(report)
    lines += ["## Targets", ""]
    for k, t in report["targets"].items():
        lines.append(f"- {k}: {json.dumps(t)}")
    return "\n".join(lines) + "\n"


def equal_compute(report: dict) -> list[str]:
    """Markdown lines setting the main variant's final recall beside every other variant's (e.g. the same
    compute spent on more contrastive steps instead of RL): per embedding mode, mean R@1 / R@5 over seeds."""
    others = [n for n in report["variants"] if n != "main"]
    if not others:
        return []
    lines = ["## Side by side: final held-out recall", "", "| variant | mode | R@1 | R@5 |", "|---|---|---|---|"]
    for name in ["main", *others]:
        for k, e in report["variants"][name]["aggregate"].items():
            if k.startswith("final-") and isinstance(e, dict) and isinstance(e.get("r1"), dict):
                lines.append(f"| {name} | {k[6:]} | {_fmt(e['r1']['mean'])} | {_fmt(e['r5']['mean'])} |")
    return [*lines, ""]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.report.learning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:key=value[,key=value]: also run the config with these overrides (e.g. "
        "soft_rank:rl.aux_soft_rank_weight=1; the paper's equal-compute comparison: "
        "more_contrastive:train.stages=[sft,contrastive],train.max_steps=1800)",
    )
    ap.add_argument("--variant-seeds", type=int, nargs="+", help="seeds of the variants (default: --seeds)")
    ap.add_argument("overrides", nargs="*", help="overrides for every run (key=value)")
    a = ap.parse_args(argv)
    log = lambda m: print(f"[elva_jax.report] {m}", flush=True)  # noqa: E731
    variants = [("main", list(a.overrides), a.seeds)]
    for spec in a.variant:
        name, sep, over = spec.partition(":")
        if not sep or not name or not over:
            raise ReportError(f"--variant {spec!r}: expected NAME:key=value[,key=value]")
        variants.append((name, list(a.overrides) + split_overrides(over), a.variant_seeds or a.seeds))
    report: dict = {"config": a.config, "machine": _machine(), "variants": {}}
    for name, over, seeds in variants:
        runs = []
        for s in seeds:
            d = a.out / (f"seed{s}" if name == "main" else f"{name}_seed{s}")
            wall = _run(a.config, d, s, over, log)
            runs.append({**collect(d), "seed": s, "wall_s_measured": wall})
        report["variants"][name] = {"overrides": over, "seeds": seeds, "runs": runs, "aggregate": aggregate(runs)}
    report["targets"] = targets(report["variants"]["main"]["aggregate"])
    import yaml

    first = Path(report["variants"]["main"]["runs"][0]["run_dir"]) / "config.yaml"
    report["chance_loss"] = math.log(yaml.safe_load(first.read_text())["train"]["global_batch"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    (a.out / "report.md").write_text(markdown(report))
    learning_curves(report, a.out / "curves.png")
    log(f"wrote {a.out / 'summary.json'}, {a.out / 'report.md'}, {a.out / 'curves.png'}")
    print(markdown(report))
    return report


if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.report.learning")
