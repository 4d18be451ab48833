"""Where a step's time goes, op by op: XLA:CPU thunks from a `jax.profiler` trace, ATen ops from
`torch.profiler`, each op put in a category (matmul, elementwise / reduce fusion, data movement,
gather / scatter, control flow, other) so the two sides can be compared.

XLA side: the trace's XLA client lines hold one event per executed thunk, named as the HLO
instruction (``ynn_fusion.4``, ``dot.1``, ``multiply_add_fusion``, ``while.3``); a ``while`` event
contains its body's events, so every op is charged its *self* time (its duration minus the events
nested in it). The category comes from the compiled HLO text: a fusion is a matmul when its fused
computation holds a ``dot`` or ``convolution`` (YNNPACK fusions included).
"""

from __future__ import annotations

import collections
import glob
import os
import re

CATEGORIES = ("matmul", "elementwise/reduce", "data movement", "gather/scatter", "control", "other")
_META = ("ThreadpoolListener", "ThunkExecutor", "end: ")
_HLO_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")  # an HLO instruction name: no spaces, no "$file:line" of a tracer
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?|\([^=]*?\))\s+([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")  # a computation's header line


def self_times(events) -> dict[str, int]:
    """{name: total self time ns} over (name, start_ns, duration_ns) events of one timeline line;
    an event's self time is its duration minus that of the events directly nested in it."""
    evs = sorted(events, key=lambda e: (e[1], -e[2]))
    out: dict[str, int] = collections.Counter()
    stack: list[list] = []  # [name, end, self]
    for name, start, dur in evs:
        while stack and stack[-1][1] <= start:
            n, _, s = stack.pop()
            out[n] += s
        if stack:
            stack[-1][2] -= min(dur, stack[-1][1] - start)
        stack.append([name, start + dur, dur])
    for n, _, s in stack:
        out[n] += s
    return dict(out)


def xla_op_times(trace_dir: str, only=None) -> dict[str, int]:
    """{HLO instruction name: self time ns} summed over the newest trace under ``trace_dir``; ``only``: the
    profiled program's instruction names (its `hlo_categories`), as for `op_self_times`."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return op_self_times(ProfileData.from_file(files[-1]).planes, only)


def op_self_times(planes, only=None) -> dict[str, int]:
    """{HLO instruction name: self time ns} over profile planes (``.lines`` of ``.events`` with
    ``name``, ``start_ns``, ``duration_ns``).

    Selected positively: only the XLA client's thunk-executor lines (``tf_XLA...``) and only events
    named like an HLO instruction, so Python tracer events (``$<frozen abc>:117 __instancecheck__``)
    or other threads' annotations never count as ops, whichever line they land on. ``only`` (a collection
    of instruction names, with "while" / "call" control events always kept): events of any other
    program that ran during the trace (another thread's computation) are left out too."""
    total: dict[str, int] = collections.Counter()
    for plane in planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            evs = [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events]
            evs = [e for e in evs if not e[0].startswith(_META) and _HLO_NAME.match(e[0])]
            if only is not None:
                evs = [e for e in evs if e[0] in only or e[0].startswith(("while", "call"))]
            for k, v in self_times(evs).items():
                total[k] += v
    return dict(total)


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (category, the jax op_name of its metadata)} of the instructions that run as
    thunks (those of the entry computation and of loop bodies; not those inside fused computations)."""
    comps: dict[str, list[str]] = {}
    comp = None
    for ln in hlo_text.splitlines():
        m = _COMP.match(ln) if not ln.startswith((" ", "HloModule")) else None  # headers are not indented
        if m:
            comp = m.group(1).lstrip("%")
            comps[comp] = []
        elif comp is not None and ln.strip() == "}":
            comp = None
        elif comp is not None:
            comps[comp].append(ln)
    fused = {
        c for lines in comps.values() for ln in lines if " fusion(" in ln for c in re.findall(r"calls=%?([\w.\-]+)", ln)
    }
    out = {}
    for cname, lines in comps.items():
        if cname in fused:
            continue
        for ln in lines:
            m = _INSTR.match(ln)
            if not m:
                continue
            name, op = m.group(1), m.group(3)
            meta = re.search(r'op_name="([^"]*)"', ln)
            calls = re.search(r"calls=%?([\w.\-]+)", ln)
            body = "\n".join(comps.get(calls.group(1), ())) if calls else ""
            if op in ("dot", "convolution") or (op == "fusion" and re.search(r"\s(dot|convolution)\(", body)):
                cat = "matmul"
            elif op == "fusion" or op in ("add", "multiply", "reduce", "exponential", "divide", "select", "compare"):
                cat = "elementwise/reduce"
            elif op in ("copy", "transpose", "broadcast", "concatenate", "pad", "slice", "reshape", "bitcast"):
                cat = "data movement"
            elif op in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort"):
                cat = "gather/scatter"
            elif op in ("while", "conditional", "call"):
                cat = "control"
            else:
                cat = "other"
            out[name] = (cat, meta.group(1) if meta else "")
    return out


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures: a microsecond op on a fast CPU must not round to zero."""
    return float(f"{x:.{digits}g}")


def summarize(op_ns: dict[str, int], cats: dict[str, tuple[str, str]], steps: int, top: int = 15) -> dict:
    """Per-step totals by category and the ``top`` ops by self time (ms per step, share)."""
    total = sum(op_ns.values()) or 1
    by_cat: dict[str, float] = collections.Counter()
    for n, v in op_ns.items():
        by_cat[cats.get(n, ("other", ""))[0]] += v
    ops = sorted(op_ns.items(), key=lambda kv: -kv[1])[:top]
    return {
        "op_time_per_step_s": _sig(total / steps / 1e9),
        "categories": {c: round(by_cat.get(c, 0) / total, 3) for c in CATEGORIES},
        "top_ops": [
            {
                "op": n,
                "category": cats.get(n, ("other", ""))[0],
                "jax_op": cats.get(n, ("", ""))[1][-80:],
                "ms_per_step": _sig(v / steps / 1e6),
                "share": round(v / total, 3),
            }
            for n, v in ops
        ],
    }


_ATEN_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::conv", "aten::_convolution")
_ATEN_MOVE = ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::t", "aten::transpose",
              "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::empty", "aten::index_put")  # fmt: skip
_ATEN_GATHER = ("aten::index", "aten::embedding", "aten::gather", "aten::scatter", "aten::masked_scatter")


def aten_category(name: str) -> str:
    if name.startswith(_ATEN_MATMUL) or "scaled_dot_product" in name or "flash_attention" in name:
        return "matmul"
    if name.startswith(_ATEN_GATHER):
        return "gather/scatter"
    if name.startswith(_ATEN_MOVE):
        return "data movement"
    if name.startswith("aten::"):
        return "elementwise/reduce"
    return "other"


def torch_profile(fn, steps: int, top: int = 15) -> dict:
    """Run ``fn()`` (``steps`` steps) under torch.profiler; the same summary from ATen self CPU times."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    rows = [(e.key, int(e.self_cpu_time_total * 1000)) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    op_ns = dict(rows)
    cats = {k: (aten_category(k), "") for k in op_ns}
    return summarize(op_ns, cats, steps, top)
