"""The documentation holds together and shipped files speak as a product: README.md is a short front door with
the two set-up commands near its top, every relative link and anchor in README.md and docs/ resolves, no shipped
file cites a tracker issue, a machine's own paths or "this machine", and the committed learning reports carry no
load figures nor absolute paths. Pure file reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# the README's "Two commands", verbatim: `.ci/run` calls the second
SETUP_COMMANDS = ("pip install -e . && python -m elva_jax.train", 'pip install -e ".[test]" && python -m pytest')
README_MAX_LINES = 200
SETUP_WITHIN_LINES = 40
SHIPPED_DIRS = ("elva_jax", "configs", "launch", "docs")
SHIPPED_FILES = ("README.md", "pyproject.toml")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")

FORBIDDEN = (
    (re.compile(r"\bissue\s*#?\s*\d+", re.IGNORECASE), "an issue number"),
    (re.compile(r"/work/|/home/|/Users/"), "a machine path"),
    (re.compile(r"this machine", re.IGNORECASE), '"this machine"'),
)
LOAD_FIGURE = re.compile(r"load[\s_-]*av(?:era)?ge?|loadavg|\bload[_-]?(?:1|5|15)m?\b", re.IGNORECASE)
ABS_PATH_IN_TEXT = re.compile(r"(?:^|[\s(\[\"'`=:,])(?:/[A-Za-z0-9._-]+/|~/|[A-Za-z]:\\)")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    s = re.sub(r"<[^>]+>", "", s).strip().lower()  # inline HTML
    s = re.sub(r"[^\w\- ]", "", s)  # \w: unicode letters, digits, underscore
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code, inline and reference style."""
    out = []
    for i, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub(lambda m: "code", line)
        out += [(i, m.group(1)) for m in LINK.finditer(line)]
        m = REF_LINK.match(line)
        if m:
            out.append((i, m.group(1)))
    return out


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_the_docs_folder_exists_and_the_readme_indexes_it():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    linked = {(README.parent / unquote(t.split("#")[0])).resolve() for _, t in links(README) if not SCHEME.match(t)}
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link to docs/{missing}"


def test_readme_is_a_front_door_with_the_setup_commands_near_the_top():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"
    top = "\n".join(lines[:SETUP_WITHIN_LINES])
    for cmd in SETUP_COMMANDS:
        assert cmd in top, f"README.md: {cmd!r} not within its first {SETUP_WITHIN_LINES} lines"


def test_ci_runs_the_readme_test_command():
    assert SETUP_COMMANDS[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_relative_link_and_anchor_resolves():
    bad = []
    cache: dict[Path, set[str]] = {}
    for page in doc_pages():
        rel = page.relative_to(ROOT)
        for line, target in links(page):
            if not target or SCHEME.match(target):
                continue
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part)
            if path_part.startswith("/"):
                dest = ROOT / path_part.lstrip("/")
            else:
                dest = (page.parent / path_part) if path_part else page
            dest = dest.resolve()
            if not dest.exists():
                bad.append(f"{rel}:{line}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                if dest not in cache:
                    cache[dest] = anchors(dest)
                if unquote(anchor) not in cache[dest]:
                    bad.append(f"{rel}:{line}: {target}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_github_slug_rules():
    learn = "Does the stack learn? (`configs/tiny_learn.yaml`)"
    assert github_slug(learn) == "does-the-stack-learn-configstiny_learnyaml"
    assert github_slug("Memory plan of Embed-RL (an 8B reasoner + a 2B embedder)") == (
        "memory-plan-of-embed-rl-an-8b-reasoner--a-2b-embedder"
    )
    assert github_slug("W4 against PyTorch + TRL, and its cost curves") == "w4-against-pytorch--trl-and-its-cost-curves"


def _shipped_files():
    for d in SHIPPED_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                yield p
    for f in SHIPPED_FILES:
        yield ROOT / f


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_shipped_files_speak_as_a_product():
    bad = []
    for path in _shipped_files():
        text = _text(path)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for pattern, what in FORBIDDEN:
                if pattern.search(line):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {what}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad)


def _json_strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_strings(v)
    elif isinstance(obj, str):
        yield obj


def test_committed_reports_hold_no_load_figures_nor_absolute_paths():
    reports = sorted(p for p in (ROOT / "elva_jax" / "report").glob("*/*") if p.suffix in (".json", ".md"))
    assert reports, "no committed report files under elva_jax/report/*/"
    bad = []
    for path in reports:
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        if LOAD_FIGURE.search(text):
            bad.append(f"{rel}: a load figure ({LOAD_FIGURE.search(text).group(0)!r})")
        if path.suffix == ".json":
            for s in _json_strings(json.loads(text)):
                if s.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", s):
                    bad.append(f"{rel}: an absolute path {s!r}")
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if ABS_PATH_IN_TEXT.search(line):
                    bad.append(f"{rel}:{i}: an absolute path: {line.strip()[:120]}")
    assert not bad, "\n".join(bad)
