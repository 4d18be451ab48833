"""The package's layers flow one way: a module imports only from its own package or a lower layer
(see the README's layout table). Stages (train, rl, eval) never import one another."""

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
    {"train", "rl", "eval"},
    {"run"},
    {"compare", "plan", "bench", "report"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# entry points only (never imported by the library): `python -m elva_jax.train` hands over to elva_jax.run
ENTRY_POINTS = {"train/__main__.py"}


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
        if path.parent == PKG and path.name == "__init__.py" or rel in ENTRY_POINTS:
            continue
        me = _unit(path)
        for line, other in _imports(path):
            if other == me:
                continue
            if RANK[other] >= RANK[me]:
                bad.append(f"elva_jax/{rel}:{line} ({me}, layer {RANK[me]}) imports {other} (layer {RANK[other]})")
    assert not bad, "\n".join(bad)


def test_no_family_name_or_patch_constant_outside_model():
    """Only `elva_jax/model/` names a backbone family (`qwen2vl`, `Qwen2VL...`) or writes a patch constant
    (1176 = 3 * 2 * 14 * 14); everything else talks to the seam. Preset names (`qwen2vl_7b_...`) are data."""
    name = re.compile(r"qwen2vl(?!_\d)", re.IGNORECASE)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if _unit(path) == "model":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if name.search(line) or re.search(r"\b1176\b", line):
                bad.append(f"elva_jax/{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
