"""``curves.png`` of a learning report, drawn with PIL (already a dependency; the eval bar charts are
drawn the same way): four panels of lines / bars with axes, ticks and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 560, 330
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 34, 40
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
GREY = (150, 150, 150)


def _smooth(y, w: int):
    y = np.asarray(y, np.float64)
    if w <= 1 or len(y) < w:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = [c[i] / i for i in range(1, w)]
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** np.floor(np.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 1e-6, step)]


class _Panel:
    def __init__(self, img: Image.Image, x0: int, y0: int, title: str, xlabel: str, ylabel: str):
        self.d = ImageDraw.Draw(img)
        self.box = (x0 + MARGIN_L, y0 + MARGIN_T, x0 + PANEL_W - MARGIN_R, y0 + PANEL_H - MARGIN_B)
        self.font = ImageFont.load_default(size=12)
        self.title_font = ImageFont.load_default(size=14)
        self.d.text((x0 + MARGIN_L, y0 + 8), title, fill=(0, 0, 0), font=self.title_font)
        self.d.text(
            (self.box[0] + (self.box[2] - self.box[0]) // 2 - 30, self.box[3] + 22),
            xlabel,
            fill=(0, 0, 0),
            font=self.font,
        )
        self.d.text((x0 + 4, y0 + 18), ylabel, fill=(60, 60, 60), font=self.font)
        self.legend: list[tuple[str, tuple]] = []

    def axes(self, xlo, xhi, ylo, yhi, xticks=True):
        self.xr, self.yr = (xlo, xhi if xhi > xlo else xlo + 1), (ylo, yhi if yhi > ylo else ylo + 1)
        l, t, r, b = self.box
        self.d.rectangle(self.box, outline=(0, 0, 0))
        for v in _ticks(*self.yr):
            y = self.ty(v)
            self.d.line([(l - 4, y), (l, y)], fill=(0, 0, 0))
            self.d.line([(l + 1, y), (r - 1, y)], fill=(235, 235, 235))
            self.d.text((l - 56, y - 7), f"{v:.3g}", fill=(0, 0, 0), font=self.font)
        if xticks:
            for v in _ticks(*self.xr):
                x = self.tx(v)
                self.d.line([(x, b), (x, b + 4)], fill=(0, 0, 0))
                self.d.text((x - 10, b + 6), f"{v:.4g}", fill=(0, 0, 0), font=self.font)

    def tx(self, v):
        l, _, r, _ = self.box
        return l + (v - self.xr[0]) / (self.xr[1] - self.xr[0]) * (r - l)

    def ty(self, v):
        _, t, _, b = self.box
        return b - (v - self.yr[0]) / (self.yr[1] - self.yr[0]) * (b - t)

    def line(self, xs, ys, colour, width=1, label=None):
        pts = [(self.tx(x), self.ty(y)) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if len(pts) > 1:
            self.d.line(pts, fill=colour, width=width)
        if label:
            self.legend.append((label, colour))

    def hline(self, y, colour, label=None):
        l, _, r, _ = self.box
        yy = self.ty(y)
        for x in range(int(l), int(r), 8):
            self.d.line([(x, yy), (min(x + 4, r), yy)], fill=colour, width=1)
        if label:
            self.legend.append((label, colour))

    def draw_legend(self):
        _, t, r, _ = self.box
        for i, (label, colour) in enumerate(self.legend):
            w = int(self.font.getlength(label))
            y = t + 6 + 15 * i
            self.d.rectangle([r - w - 30, y + 3, r - w - 18, y + 10], fill=colour)
            self.d.text((r - w - 12, y), label, fill=(0, 0, 0), font=self.font)


def _range(series, pad=0.05):
    vals = np.concatenate([np.asarray(s, np.float64) for s in series if len(s)]) if series else np.zeros(1)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo or abs(hi) or 1.0
    return lo - pad * span, hi + pad * span


def learning_curves(report: dict, path: str | Path) -> None:
    """Write the 2 x 2 panel figure of ``report`` (`elva_jax.report.learning.main`'s dict) to ``path``."""
    img = Image.new("RGB", (2 * PANEL_W, 2 * PANEL_H), (255, 255, 255))
    variants = report["variants"]
    main = variants["main"]["runs"]

    # 1. contrastive loss per step
    curves = []  # (seed, steps, loss): the logged curve, else the per-step losses of one invocation
    for r in main:
        c = r.get("loss_curve") or {}
        if c.get("loss"):
            curves.append((r["seed"], c["step"], _smooth(c["loss"], 3), "mean of 3 logged"))
        elif r["loss"]:
            curves.append((r["seed"], range(1, len(r["loss"]) + 1), _smooth(r["loss"], 10), "mean of 10"))
    contrastive = bool(curves)
    if not contrastive:  # no contrastive stage (Embed-RL): the warm start's loss instead
        curves = [(r["seed"], r["sft"]["step"], r["sft"]["loss"], "logged") for r in main if r["sft"]["loss"]]
    title = "Contrastive training loss (InfoNCE)" if contrastive else "Warm start: target NLL (sft)"
    p = _Panel(img, 0, 0, title, "step", "loss")
    p.axes(1, max((max(c[1]) for c in curves), default=2), *_range([c[2] for c in curves] or [[0, 1]]))
    for i, (seed, steps, y, how) in enumerate(curves):
        p.line(steps, y, COLOURS[i % len(COLOURS)], label=f"seed {seed} ({how})")
    if report.get("chance_loss") and contrastive:
        p.hline(report["chance_loss"], GREY, label="ln(batch): uniform scores")
    p.draw_legend()

    # 2. RL mean reward per step, every variant: per seed thin, mean over seeds thick
    p = _Panel(img, PANEL_W, 0, "RL: mean total reward per step", "RL step", "reward")
    series = [r["rl"]["reward"] for v in variants.values() for r in v["runs"]]
    p.axes(1, max((len(s) for s in series), default=2), *_range(series))
    for vi, (name, v) in enumerate(variants.items()):
        colour = COLOURS[vi % len(COLOURS)]
        light = tuple(int(c + (255 - c) * 0.6) for c in colour)
        rs = [r["rl"]["reward"] for r in v["runs"] if r["rl"]["reward"]]
        for s in rs:
            p.line(range(1, len(s) + 1), s, light)
        if rs:
            n = min(len(s) for s in rs)
            m = np.mean([s[:n] for s in rs], axis=0)
            sl = v["aggregate"].get("reward_slope", {})
            lab = f"{name}: mean of {len(rs)} seeds, slope {sl.get('mean', float('nan')):.1e}/step"
            p.line(range(1, n + 1), m, colour, width=3, label=lab)
    p.draw_legend()

    # 3. the policy on the held-out probe set (fixed sampling key) beside the noisy per-step training reward
    p = _Panel(img, 0, PANEL_H, "RL: held-out probe reward (fixed key) vs training reward", "RL step", "reward")
    probes = [r["probe"] for r in main if r.get("probe", {}).get("reward")]
    train = [r["rl"]["reward"] for r in main if r["rl"]["reward"]]
    series = [pr["reward"] for pr in probes] + train
    p.axes(0, max([len(s) for s in train] + [max(pr["step"]) for pr in probes] + [2]), *_range(series or [[0, 1]]))
    if train:
        n = min(len(s) for s in train)
        p.line(range(1, n + 1), np.mean([s[:n] for s in train], axis=0), GREY, label="training reward (mean of seeds)")
    curve = variants["main"]["aggregate"].get("probe_curve")
    if probes and curve:
        light = tuple(int(c + (255 - c) * 0.6) for c in COLOURS[0])
        for pr in probes:
            p.line(pr["step"], pr["reward"], light)
        if len(probes) >= 2:
            p.line(curve["step"], curve["lo"], COLOURS[1], label="95 % interval of the mean")
            p.line(curve["step"], curve["hi"], COLOURS[1])
        sl = variants["main"]["aggregate"].get("probe_slope", {})
        lab = f"probe, mean of {len(probes)} seeds, slope {sl.get('mean', float('nan')):.1e}/step"
        p.line(curve["step"], curve["mean"], COLOURS[0], width=3, label=lab)
    p.draw_legend()

    if any("format" in r.get("probe", {}) for r in main) and not any(r["eval"] for r in main):
        _probe_rates(img, main)  # Embed-RL: no embedder of its own to evaluate
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return

    # 4. test recall per stage (bars: R@1 and R@5, mean over seeds, every variant), chance dashed
    p = _Panel(img, PANEL_W, PANEL_H, "Held-out test recall (bundled tasks, mean over seeds)", "", "recall")
    order = ["start-eol", "before_rl-eol", "final-eol", "start-ret", "before_rl-ret", "final-ret"]
    bars = []
    for vi, (name, v) in enumerate(variants.items()):
        agg = v["aggregate"]
        for k in order:
            if k in agg and (vi == 0 or k.startswith("final")):
                bars.append((f"{k}" if vi == 0 else f"{k}\n{name}", agg[k], COLOURS[vi % len(COLOURS)]))
    top = max([b[1]["r5"]["max"] for b in bars] + [0.1])
    p.axes(0, max(1, len(bars)), 0, min(1.0, top * 1.15), xticks=False)
    l, t, r, b = p.box
    w = (r - l) / max(1, len(bars))
    for i, (label, e, colour) in enumerate(bars):
        x = l + i * w
        for j, (f, shade) in enumerate((("r1", 0.0), ("r5", 0.55))):
            c = tuple(int(cc + (255 - cc) * shade) for cc in colour)
            x0, x1 = x + 4 + j * (w - 8) / 2, x + 4 + (j + 1) * (w - 8) / 2 - 1
            p.d.rectangle([x0, p.ty(e[f]["mean"]), x1, b], fill=c)
            p.d.line([((x0 + x1) / 2, p.ty(e[f]["min"])), ((x0 + x1) / 2, p.ty(e[f]["max"]))], fill=(0, 0, 0))
        small = ImageFont.load_default(size=9)
        p.d.multiline_text((x + 2, b + 4), label.replace("before_rl", "pre-RL"), fill=(0, 0, 0), font=small, spacing=1)
    if bars:
        p.hline(bars[0][1]["chance_r1"]["mean"], GREY, label="chance R@1")
        p.hline(bars[0][1]["chance_r5"]["mean"], (90, 90, 90), label="chance R@5")
    p.legend.insert(0, ("R@1 (dark) / R@5 (light); bar: min-max", (60, 60, 60)))
    p.draw_legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _probe_rates(img: Image.Image, runs: list[dict]) -> None:
    """Panel 4 of an Embed-RL report: the probe's format-valid rate and in-batch accuracy per seed."""
    p = _Panel(img, PANEL_W, PANEL_H, "Embed-RL probe: format-valid rate and retrieval accuracy", "RL step", "rate")
    probes = [r["probe"] for r in runs if r["probe"].get("format")]
    p.axes(0, max([max(pr["step"]) for pr in probes] + [2]), 0, 1)
    for k, colour in (("format", COLOURS[0]), ("acc", COLOURS[2])):
        for i, pr in enumerate(probes):
            p.line(pr["step"], pr[k], colour, width=2, label=f"{k} (one line per seed)" if i == 0 else None)
    p.draw_legend()
