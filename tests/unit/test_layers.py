"""The package's layers flow one way: a module imports only from its own package or a lower layer
(docs/architecture.md). Stages never import one another. Every import counts, function-local ones
included, and inside a package the modules form no circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "elva_jax"
LAYERS = [
    {"errors"},
    {"configlib", "parallel"},
    {"model"},
    {"retrieval", "data"},
    {"schema"},
    {"runtime"},
    {"contrastive", "rl", "eval"},
    {"train"},
    {"compare", "plan", "bench", "report"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elva_jax."):
            yield node.lineno, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("elva_jax."):
                    yield node.lineno, a.name.split(".")[1]


def test_every_package_has_a_layer():
    units = {_unit(p) for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_imports_flow_down():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if path.parent == PKG and path.name == "__init__.py":
            continue
        me = _unit(path)
        for line, other in _imports(path):
            if other == me:
                continue
            if RANK[other] >= RANK[me]:
                bad.append(f"elva_jax/{rel}:{line} ({me}, layer {RANK[me]}) imports {other} (layer {RANK[other]})")
    assert not bad, "\n".join(bad)


#: Qwen special-token ids (<|endoftext|>, <|im_end|>, vision tokens): code reads them from the tokenizer or model config
_TOKEN_IDS = re.compile(r"\b(151643|151645|151652|151653|151655|151656)\b")
_MEDIA_SETTINGS = PKG / "data" / "media" / "settings.py"  # where LamRA's media defaults are declared, once


def _media_literal(line: str) -> bool:
    """LamRA's pixel limits (3136 = 4 * 28 * 28, 235200 = 300 * 28 * 28) or its 1200-patch row written out."""
    if re.search(r"\b(3136|235200)\b", line):
        return True
    return bool(re.search(r"\b1200\b", line) and re.search(r"patch|row|\bLv\b", line, re.IGNORECASE))


def test_no_family_name_or_patch_constant_outside_model():
    """Only `elva_jax/model/` names a backbone family (`qwen2vl`, `Qwen2VL...`), writes a patch constant
    (1176 = 3 * 2 * 14 * 14) or a special-token id (151643 ...: code reads them from the tokenizer or the
    model config); everything else talks to the seam. Preset names (`qwen2vl_7b_...`) are data. LamRA's pixel
    limits and patch row are written only where `MediaSettings` declares them (3136, 235200, a 1200-patch row)."""
    name = re.compile(r"qwen2vl(?!_\d)", re.IGNORECASE)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if _unit(path) == "model":
            continue
        media_ok = path == _MEDIA_SETTINGS
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if (
                name.search(line)
                or re.search(r"\b1176\b", line)
                or _TOKEN_IDS.search(line)
                or (not media_ok and _media_literal(line))
            ):
                bad.append(f"elva_jax/{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = ("elva_jax", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """{module: modules it imports (at any depth of its code)}, over every module of the package; an import
    of a package's name counts as an import of its ``__init__``, ``from pkg import mod`` as one of ``pkg.mod``."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_pkg = path.name == "__init__.py"
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join([*base, mod] if mod else base)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in paths else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in paths:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.add(t)
        graph[name] = out
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_circle_finder_finds_circles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert _circles(g) == [["a", "b", "c"]]
    assert _circles({"x": {"y"}, "y": set()}) == []


def test_no_module_circle():
    circles = _circles(_module_graph())
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_no_module_over_600_lines_nor_function_over_130():
    long_modules, long_functions = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        rel = f"elva_jax/{path.relative_to(PKG)}"
        if text.count("\n") > 600:
            long_modules.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 130:
                long_functions.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


# modules allowed a function-local import of the package, and why
LOCAL_IMPORTS = {
    "eval/__main__.py": "`python -m elva_jax.eval --help` answers without loading jax",
    "data/prepare.py": "imports itself as a module so that `datasets` can hash its functions",
    "retrieval/__init__.py": "streaming_topk on first use: the metrics alone do not load jax",
    "bench/rl_step.py": "the PyTorch side (rl_step_torch imports torch)",
    "bench/train_step.py": "the PyTorch side (rl_step_torch imports torch)",
}


def test_imports_of_the_package_are_at_module_top():
    """The graph is what a module's top says: no function-local import of elva_jax outside LOCAL_IMPORTS."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel in LOCAL_IMPORTS:
            continue
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.startswith("elva_jax") for n in names) or getattr(node, "level", 0):
                bad.append(f"elva_jax/{rel}:{node.lineno}")
    assert not bad, "function-local imports of the package:\n" + "\n".join(bad)
