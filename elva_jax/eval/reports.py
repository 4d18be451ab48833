"""The reports of a retrieval evaluation: ``results.json`` (per task, averages, settings), ``results.md`` (one
row per task with R@K and the average, the paper's layout) and ``recall.png`` (R@K per task; before/after
bars with ``eval.compare_to``). MMEB-V2 writes its own (:func:`elva_jax.eval.mmeb.write_reports`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from elva_jax.eval.tasks import EvalDataError

__all__ = ["pct", "read_before", "write_reports"]


def pct(x) -> str:
    """A fraction as a percentage with one decimal; "–" for None or NaN."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def read_before(path: str | Path) -> dict:
    """The results.json of ``eval.compare_to``: the "before" of the table and the bars."""
    cp = Path(path)
    if not cp.is_file():
        raise FileNotFoundError(f"--compare-to {cp}: file not found")
    try:
        before = json.loads(cp.read_text())
        assert isinstance(before.get("tasks"), dict)
    except (ValueError, AssertionError):
        raise EvalDataError(f"--compare-to {cp}: not a results.json of elva_jax.eval") from None
    return before


def write_reports(results: dict, out: str | Path, before: dict | None = None) -> dict:
    """Write results.json, results.md and recall.png into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "md": str(out / "results.md"), "png": str(out / "recall.png")}
    results = {**results, "files": paths}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    Path(paths["md"]).write_text(_markdown(results, before))
    _bar_chart(results, before, Path(paths["png"]))
    return paths


def _markdown(results: dict, before: dict | None) -> str:
    s = results["settings"]
    ks = s["recall_ks"]
    bt = (before or {}).get("tasks", {})
    head = ["Task", "Modality", "K"] + (["R@K before", "R@K", "Δ"] if before else ["R@K"])
    head += [f"R@{k}" for k in ks] + ["MRR", "Queries", "Candidates"]
    lines = [
        f"# Retrieval results: {s['benchmark']} ({s['mode']} embedding, {s['pool']} pool)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for name, r in results["tasks"].items():
        row = [name, r["modality"], str(r["k"])]
        if before:
            b = bt.get(name, {}).get("recall_at_k")
            delta = "–" if b is None else f"{100 * (r['recall_at_k'] - b):+.1f}"
            row += [pct(b), pct(r["recall_at_k"]), delta]
        else:
            row.append(pct(r["recall_at_k"]))
        row += [pct(r["recall"][str(k)]) for k in ks]
        row += [f"{r['mrr']:.3f}", str(r["n_queries"]), str(r["n_candidates"])]
        lines.append("| " + " | ".join(row) + " |")
    for g, a in results["averages"].items():
        label = "**Average**" if g == "all" else f"**Average ({g})**"
        row = [label, "", ""]
        if before:
            b = (before.get("averages", {}).get(g) or {}).get("recall_at_k")
            delta = "–" if b is None else f"{100 * (a['recall_at_k'] - b):+.1f}"
            row += [pct(b), f"**{pct(a['recall_at_k'])}**", delta]
        else:
            row.append(f"**{pct(a['recall_at_k'])}**")
        row += [""] * (len(ks) + 3)
        lines.append("| " + " | ".join(row) + " |")
    emb = s["embedding"]
    lines += [
        "",
        "Recall@K in %, K per task (UniIR: a query is a hit if any qrels positive is in its top K); "
        f"MRR truncated at the top-{s['topk']} (or the whole pool when smaller).",
        "",
        f"- mode: {s['mode']} ({s.get('mode_source', 'eval.mode')})",
        f"- embedding: {emb['embedding']}" + (f"; summary {json.dumps(emb['summary'])}" if "summary" in emb else ""),
        f"- instructions: {s['instruction_rule']}",
        f"- ties: {s.get('tie_order', 'index')} order"
        + (" (faiss IndexFlatIP's, as UniIR)" if s.get("tie_order") == "faiss" else " (lower candidate index first)"),
        f"- pool: {s['pool']}; checkpoint: {s['checkpoint']}" + (f" (step {s['step']})" if s.get("step") else ""),
        f"- dtype {s['dtype']}, positions {s['position_mode']}, max length {emb['max_length']}"
        + (f", first {s['max_queries']} queries per task" if s.get("max_queries") else ""),
    ]
    if before:
        lines.append(f"- before: {results.get('compare_to', '')}")
    gm = results.get("grain_masking")
    if gm:
        lines += [
            "",
            "## Grain masking",
            "",
            f"Mean cosine distance between a query's embedding and the embedding with one grain phrase removed: "
            f"**{gm['mean_cosine_distance']:.4f}** ({gm['n_queries']} queries, {gm['n_phrases']} phrases, "
            f"{gm['queries_from']}).",
            "",
            "| Grain kind | Mean distance |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in gm["by_kind"].items()]
    return "\n".join(lines) + "\n"


def _bar_chart(results: dict, before: dict | None, path: Path) -> None:
    """R@K per task (and the average) as a PNG bar chart drawn with PIL; grey = before, blue = now."""
    names = list(results["tasks"]) + ["average"]
    now = [results["tasks"][n]["recall_at_k"] for n in names[:-1]] + [results["averages"]["all"]["recall_at_k"]]
    prev = None
    if before:
        bt = before.get("tasks", {})
        prev = [bt.get(n, {}).get("recall_at_k") for n in names[:-1]]
        prev.append((before.get("averages", {}).get("all") or {}).get("recall_at_k"))
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    group_w = 56 if prev else 40
    text_w = int(max(small.getlength(n) for n in names)) + 8
    slant = int(text_w * 0.71) + 16  # extent of a label rotated by 45 degrees
    left, right, top, bottom = max(60, slant - group_w // 2 + 10), 20, 50, slant + 20
    plot_h = 300
    W = left + right + group_w * len(names)
    H = top + plot_h + bottom
    img = Image.new("RGB", (max(W, 360), H), "white")
    d = ImageDraw.Draw(img)
    s = results["settings"]
    d.text((left, 12), f"Recall@K (%) - {s['benchmark']}, {s['mode']}, {s['pool']} pool", fill="black", font=font)
    y0 = top + plot_h
    for v in range(0, 101, 20):
        y = y0 - plot_h * v / 100
        d.line([(left, y), (left + group_w * len(names), y)], fill=(225, 225, 225))
        d.text((left - 8, y), str(v), fill="black", font=small, anchor="rm")
    d.line([(left, top), (left, y0)], fill="black")
    d.line([(left, y0), (left + group_w * len(names), y0)], fill="black")
    blue, grey = (52, 101, 164), (170, 170, 170)
    for i, n in enumerate(names):
        x = left + i * group_w + 6
        bars = [(prev[i], grey), (now[i], blue)] if prev else [(now[i], blue)]
        bw = (group_w - 12) // len(bars)
        for j, (v, colour) in enumerate(bars):
            if v is None:
                continue
            h = plot_h * max(0.0, min(1.0, v))
            bx = x + j * bw
            d.rectangle([bx, y0 - h, bx + bw - 2, y0], fill=colour)
            d.text((bx + bw / 2 - 1, y0 - h - 2), f"{100 * v:.0f}", fill="black", font=small, anchor="mb")
        label = Image.new("RGBA", (text_w, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((text_w - 2, 8), n, fill="black", font=small, anchor="rm")
        label = label.rotate(45, expand=True, resample=Image.Resampling.BICUBIC)
        img.paste(label, (int(x + group_w / 2 - label.width + 6), y0 + 2), label)
    if prev:
        lx = max(W, 360) - 150
        d.rectangle([lx, 14, lx + 10, 24], fill=grey)
        d.text((lx + 14, 19), "before", fill="black", font=small, anchor="lm")
        d.rectangle([lx + 70, 14, lx + 80, 24], fill=blue)
        d.text((lx + 84, 19), "after", fill="black", font=small, anchor="lm")
    img.save(path)
