"""Texts of the bundled multi-grain set, built from segments (plain strings and grain pieces) so every
grain phrase keeps its character span: captions, paraphrases, edit texts, and target summaries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from elva_jax.data.benchmarks.multigrain.scenes import POSITIONS, Scene

__all__ = [
    "N_SUMMARIES",
    "SUMMARY_DROP",
    "caption",
    "caption_segments",
    "edit_segments",
    "paraphrase_segments",
    "render_segments",
    "summary_text",
    "summary_variants",
]

_POS_PHRASE = {
    p: ("in the center" if p == "center" else f"on the {p}" if p in ("left", "right") else f"at the {p}")
    for p in POSITIONS
}
_POS_PARAPHRASE = {
    "top left": "in the upper left corner",
    "top": "near the top",
    "top right": "in the upper right corner",
    "left": "on the left side",
    "center": "in the middle",
    "right": "on the right side",
    "bottom left": "in the lower left corner",
    "bottom": "near the bottom",
    "bottom right": "in the lower right corner",
}
_SIZE_PARAPHRASE = {"small": ("little", "tiny"), "large": ("big", "huge")}
_COUNT_WORDS = ("one", "two", "three")


# ----------------------------------------------------------------------------------------------------
# texts as segments: plain strings and grain pieces (phrase, kind, object index or None, role)


class _Grain(NamedTuple):
    phrase: str
    kind: str
    obj: int | None
    role: str


def render_segments(segments: Sequence[str | _Grain]) -> tuple[str, list[dict]]:
    """Concatenate segments -> (text, grain records with character spans into text)."""
    text, grains = "", []
    for seg in segments:
        if isinstance(seg, _Grain):
            grains.append(
                {
                    "phrase": seg.phrase,
                    "kind": seg.kind,
                    "object": seg.obj,
                    "role": seg.role,
                    "span": [len(text), len(text) + len(seg.phrase)],
                }
            )
            text += seg.phrase
        else:
            text += seg
    return text, grains


def _count_phrase(n: int) -> str:
    return f"{_COUNT_WORDS[n - 1]} shape{'s' if n > 1 else ''}"


def _joiner(i: int, n: int) -> str:
    return "" if i == 0 else " and " if i == n - 1 else ", "


def caption_segments(scene: Scene) -> list[str | _Grain]:
    segs: list[str | _Grain] = [_Grain(_count_phrase(len(scene)), "count", None, "describe"), ": "]
    for i, o in enumerate(scene):
        segs += [_joiner(i, len(scene)), "a "]
        segs += [_Grain(o.size, "size", i, "describe"), " ", _Grain(o.colour, "colour", i, "describe"), " "]
        segs += [
            _Grain(o.shape, "shape", i, "describe"),
            " ",
            _Grain(_POS_PHRASE[o.position], "position", i, "describe"),
        ]
    return segs


def caption(scene: Scene) -> str:
    """Canonical caption naming every grain, objects in reading order (injective over scenes)."""
    return render_segments(caption_segments(scene))[0]


#: target summaries written per side (``src_content["summary"]``): the canonical one, then variants
N_SUMMARIES = 4
SUMMARY_DROP = 0.35  # in partial variants, each object's size / colour / position is left out with this chance


def summary_text(scene: Scene, order: Sequence[int] | None = None, keep: dict | None = None) -> str:
    """A short grain summary: per object ``size colour shape position``, objects joined by ", "
    (``"small red circle top left, large blue square bottom"``). ``order``: object order (default:
    reading order); ``keep[(i, kind)] = False`` leaves that grain of object i out (shapes always stay)."""
    keep = keep or {}
    parts = []
    for i in order if order is not None else range(len(scene)):
        o = scene[i]
        words = [o.size, o.colour, o.shape, o.position]
        kinds = ("size", "colour", "shape", "position")
        parts.append(" ".join(w for w, k in zip(words, kinds, strict=True) if keep.get((i, k), True)))
    return ", ".join(parts)


def summary_variants(scene: Scene, rng: random.Random, n: int = N_SUMMARIES) -> list[str]:
    """``n`` target summaries of ``scene``: [canonical (reading order, every grain), the objects in a random
    order, then partial ones (random order, each size / colour / position left out with chance
    SUMMARY_DROP)]: a summariser trained on them writes varied summaries, so sampling explores."""
    out = [summary_text(scene)]
    while len(out) < n:
        order = list(range(len(scene)))
        rng.shuffle(order)
        keep = {}
        if len(out) >= 2:
            keep = {(i, k): rng.random() >= SUMMARY_DROP for i in order for k in ("size", "colour", "position")}
        out.append(summary_text(scene, order, keep))
    return out


def paraphrase_segments(scene: Scene, rng: random.Random) -> list[str | _Grain]:
    n = len(scene)
    intro = rng.choice((f"there {'is' if n == 1 else 'are'} ", "a picture with ", "an image showing "))
    segs: list[str | _Grain] = [intro, _Grain(_count_phrase(n), "count", None, "describe"), ": "]
    order = list(range(n))
    if rng.random() < 0.5:
        order.reverse()
    position_first = rng.random() < 0.5
    for j, i in enumerate(order):
        o = scene[i]
        size = _Grain(rng.choice(_SIZE_PARAPHRASE[o.size]), "size", i, "describe")
        colour, shape = _Grain(o.colour, "colour", i, "describe"), _Grain(o.shape, "shape", i, "describe")
        pos = _Grain(_POS_PARAPHRASE[o.position], "position", i, "describe")
        segs.append(_joiner(j, n))
        if position_first:
            segs += [pos, " a ", size, " ", colour, " ", shape]
        else:
            article = "an " if o.colour[0] in "aeiou" else "a "
            segs += [article, colour, " ", shape, " that is ", size, " ", pos]
    return segs


def edit_segments(source: Scene, target: Scene, edit: dict) -> list[str | _Grain]:
    """Modification text turning ``source`` into ``target``: reference grains index ``source`` objects,
    edit grains index ``target`` objects (None for the count word)."""

    def ref(i: int) -> list[str | _Grain]:
        o = source[i]
        return [
            "the ",
            _Grain(o.size, "size", i, "reference"),
            " ",
            _Grain(o.colour, "colour", i, "reference"),
            " ",
            _Grain(o.shape, "shape", i, "reference"),
            " ",
            _Grain(_POS_PHRASE[o.position], "position", i, "reference"),
        ]

    kind, i, t = edit["kind"], edit["object"], edit["target_object"]
    if kind == "colour":
        return ["make ", *ref(i), " ", _Grain(edit["new"], "colour", t, "edit")]
    if kind == "shape":
        return ["turn ", *ref(i), " into a ", _Grain(edit["new"], "shape", t, "edit")]
    if kind == "size":
        return ["make ", *ref(i), " ", _Grain(edit["new"], "size", t, "edit")]
    if kind == "position":
        return ["move ", *ref(i), " ", _Grain(f"to the {edit['new']}", "position", t, "edit")]
    if edit["new"] == "remove":
        return [_Grain("remove", "count", None, "edit"), " ", *ref(i)]
    o = target[t]
    return [
        _Grain("add", "count", None, "edit"),
        " a ",
        _Grain(o.size, "size", t, "edit"),
        " ",
        _Grain(o.colour, "colour", t, "edit"),
        " ",
        _Grain(o.shape, "shape", t, "edit"),
        " ",
        _Grain(_POS_PHRASE[o.position], "position", t, "edit"),
    ]
