"""W4 cost curves: RL step time and peak host memory as the candidate list, G and the summary budget grow.

    python -m elva_jax.bench.rl_scaling [--candidates 9,33,102] [--groups 4,8,16] [--summaries 16,32,64]
                                        [--sides jax,torch] [--jax-steps 1] [--torch-steps 0]
                                        [--torch-max-sequences 300] [--remat | --remat-above 300]
                                        [--timeout 3600] [--out bench/rl_scaling] [--resume]

One axis varies at a time around W4 (1 + 8 candidates, G 8, 16-token summaries); 1 + 101 is the paper's
candidate count. Every (side, configuration) runs `python -m elva_jax.bench.rl_step --side ...` in a
fresh subprocess, so its peak RSS (ru_maxrss, reported by the child itself) is its own; elva_jax's
time is the median of ``--jax-steps`` steps after one compiling step, the reference's of
``--torch-steps`` steps after one warm-up step (0: the single step, which needs no compile). The
reference is skipped (and said so) above ``--torch-max-sequences`` sequences per step (G (2 + N)).
Growth is fitted per axis and side as the least-squares slope of log(value) on log(x) (time ~ x^slope).
Writes ``OUT.json`` and ``OUT.svg`` (a log-log plot drawn here: the project does not depend on a
plotting library).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from elva_jax.bench import rl_step

BASE = {"candidates": 9, "G": 8, "summary": 16}  # W4


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def run_one(side: str, cfg: dict, steps: int, timeout: int, data: str, remat: bool = False) -> dict:
    """One configuration on one side in a fresh process: its JSON result, or {"error": ...}."""
    cmd = [sys.executable, "-m", "elva_jax.bench.rl_step", "--side", side, "--steps", str(steps)]
    cmd += ["--negatives", str(cfg["candidates"] - 1), "--group-size", str(cfg["G"])]
    cmd += ["--summary-tokens", str(cfg["summary"]), "--data", data] + (["--remat"] if remat and side == "jax" else [])
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    wall = round(time.perf_counter() - t, 1)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        killed = " (killed: out of memory?)" if p.returncode in (-9, 137) else ""
        return {"error": f"exit {p.returncode}{killed}: {' | '.join(tail)}", "wall_s": wall}
    res = json.loads(lines[-1])
    key = "elva_jax" if side == "jax" else "torch"
    return {
        **res[key],
        "peak_rss_mb": res["peak_rss_mb"],
        "sequences_per_step": res["sequences_per_step"],
        "wall_s": wall,
    }


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3) if sxx else None


def write_svg(path: str, axes: dict, results: list[dict]) -> None:
    """Log-log panels: one column per axis, rows step time and peak RSS; one line per side."""
    colors = {"jax": "#1f77b4", "torch": "#d62728"}
    W, H, pad = 300, 220, 45
    rows = (("step_s", "step time (s)"), ("peak_rss_mb", "peak RSS (MiB)"))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(axes)}" height="{H * 2 + 30}" font-size="11">']
    out.append('<rect width="100%" height="100%" fill="white"/>')
    for ci, (axis, xs) in enumerate(axes.items()):
        for ri, (metric, label) in enumerate(rows):
            x0, y0 = ci * W + pad, ri * H + 20
            w, h = W - pad - 15, H - pad - 10
            pts = [(r["x"], r[metric]) for r in results if r["axis"] == axis and r.get(metric)]
            if not pts:
                continue
            lx = [math.log(v) for v in xs]
            ly = [math.log(p[1]) for p in pts]
            xa, xb = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
            ya, yb = min(ly) - 0.1, max(ly) + 0.1

            def X(v, xa=xa, xb=xb, x0=x0, w=w):
                return x0 + (math.log(v) - xa) / (xb - xa) * w

            def Y(v, ya=ya, yb=yb, y0=y0, h=h):
                return y0 + h - (math.log(v) - ya) / (yb - ya) * h

            out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
            for v in xs:
                out.append(f'<text x="{X(v):.0f}" y="{y0 + h + 14}" text-anchor="middle">{v}</text>')
            for v in (math.exp(ya + 0.1), math.exp(yb - 0.1)):
                out.append(f'<text x="{x0 - 4}" y="{Y(v) + 4:.0f}" text-anchor="end">{v:.3g}</text>')
            out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 28}" text-anchor="middle">{axis} ({label})</text>')
            for side, col in colors.items():
                sp = sorted(
                    (r["x"], r[metric]) for r in results if r["axis"] == axis and r["side"] == side and r.get(metric)
                )
                if sp:
                    poly = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in sp)
                    out.append(f'<polyline points="{poly}" fill="none" stroke="{col}" stroke-width="2"/>')
                    out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{col}"/>' for x, y in sp]
    out.append(
        '<text x="10" y="14" fill="#1f77b4">elva_jax</text><text x="70" y="14" fill="#d62728">PyTorch ref</text>'
    )
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.bench.rl_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", default="9,33,102", help="1 + negatives")
    ap.add_argument("--groups", default="4,8,16")
    ap.add_argument("--summaries", default="16,32,64")
    ap.add_argument("--base", default="9,8,16", help="candidates,G,summary held while another axis varies (W4)")
    ap.add_argument("--sides", default="jax,torch")
    ap.add_argument("--jax-steps", type=int, default=1)
    ap.add_argument("--torch-steps", type=int, default=0)
    ap.add_argument("--torch-max-sequences", type=int, default=300)
    ap.add_argument("--remat", action="store_true", help="elva_jax side with --remat everywhere")
    ap.add_argument(
        "--remat-above",
        type=int,
        default=0,
        help="elva_jax side with --remat only above this many sequences per step (1 + 101 at G 8 needs it on 23 GB)",
    )
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    ap.add_argument("--out", default=os.path.join("bench", "rl_scaling"))
    ap.add_argument(
        "--resume", action="store_true", help="reuse the measured points of an earlier OUT.json (same side and sizes)"
    )
    a = ap.parse_args(argv)
    base = dict(zip(("candidates", "G", "summary"), _ints(a.base), strict=True))
    axes = {"candidates": _ints(a.candidates), "G": _ints(a.groups), "summary": _ints(a.summaries)}
    data = os.path.join(tempfile.mkdtemp(), "mg")
    rl_step.bench_instances(data, 1, 1)  # generate the bundled data once, shared by every subprocess
    done: dict = {}
    if a.resume and os.path.exists(a.out + ".json"):
        with open(a.out + ".json") as f:
            for r in json.load(f)["results"]:
                if "step_s" in r:  # errors and skips are measured again
                    keep = {k: v for k, v in r.items() if k not in ("axis", "x", "side", "candidates", "G", "summary")}
                    done[(r["side"], r["candidates"], r["G"], r["summary"])] = keep
    results = []
    for axis, xs in axes.items():
        for x in xs:
            cfg = {**base, axis: x}
            for side in a.sides.split(","):
                key = (side, cfg["candidates"], cfg["G"], cfg["summary"])
                seqs = cfg["G"] * (1 + cfg["candidates"])
                if key not in done:
                    if side == "torch" and seqs > a.torch_max_sequences:
                        done[key] = {"skipped": f"{seqs} sequences per step > --torch-max-sequences"}
                    else:
                        steps = a.jax_steps if side == "jax" else a.torch_steps
                        remat = a.remat or bool(a.remat_above and seqs > a.remat_above)
                        res = run_one(side, cfg, steps, a.timeout, data, remat)
                        done[key] = {**res, "remat": remat and side == "jax"}
                    print(json.dumps({"side": side, **cfg, **done[key]}), file=sys.stderr, flush=True)
                results.append({"axis": axis, "x": x, "side": side, **cfg, **done[key]})
                out = finish(a, base, axes, results)  # after every configuration: a partial run keeps its points
    print(json.dumps({"fits": out["fits"], "json": a.out + ".json", "plot": a.out + ".svg"}))
    return out


def finish(a, base, axes, results) -> dict:
    """Fits over the points so far; writes OUT.json and OUT.svg."""
    fits = {}
    for axis in axes:
        for side in a.sides.split(","):
            rs = [r for r in results if r["axis"] == axis and r["side"] == side and "step_s" in r]
            fits[f"{side}/{axis}"] = {
                "step_s_slope": loglog_slope([r["x"] for r in rs], [r["step_s"] for r in rs]),
                "peak_rss_slope": loglog_slope([r["x"] for r in rs], [r["peak_rss_mb"] for r in rs]),
                **{
                    f"{k.replace('time_', '').replace('_s', '')}_slope": loglog_slope(
                        [r["x"] for r in rs], [r[k] for r in rs]
                    )
                    for k in ("time_rollout_s", "time_reforward_s", "time_update_s")
                },
            }
    out = {"workload": "W4 scaling", "base": base, "axes": axes, "results": results, "fits": fits}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    write_svg(a.out + ".svg", axes, results)
    return out


if __name__ == "__main__":
    main()
