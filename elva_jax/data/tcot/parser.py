"""Embed-RL's evidence-traceable chain of thought (T-CoT): a strict, total parser over decoded text.

The reasoner writes (Embed-RL's prompts, ``verl/utils/dataset/vlm2vec_dataset.py``)::

    <thinking>free text {"bbox_2d": [x1, y1, x2, y2]}</thinking>
    <rethink>...</rethink>
    <answer>...</answer>

with one JSON evidence object inside ``<thinking>``: ``{"text_keywords": [str, ...]}`` (text inputs),
``{"bbox_2d": box or [box, ...]}`` with ``box = [x1, y1, x2, y2]`` in 0-1000 coordinates (images), or
``{"key_frames": [k, ...]}`` with 1-based frame indices (videos).

Two checks (``check``):

* ``"tags"``: the official ``check_format`` -- the six tags occur in the order ``<thinking> </thinking>
  <rethink> </rethink> <answer> </answer>`` somewhere in the text (the regex
  ``<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>`` with ``re.search`` and
  DOTALL); anything may stand around or between them and the evidence is not looked at.
* ``"strict"``: each tag exactly once, in that order, only whitespace outside the three blocks,
  non-empty rethink and answer, and a well-formed evidence object (checked field by field below).

Both are total: any input (even a non-string) gives a :class:`TCoT` whose ``reason`` names the first
failed check (one of :data:`REASONS`); no exception escapes.

The evidence kind a side asks for (:func:`expected_evidence`, the official prompts' choice by modality):
``key_frames`` for a side with a video, ``bbox_2d`` for one with an image (with or without text),
``text_keywords`` for text alone. The official reward never checks it (its check is "tags").
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

TAGS = ("<thinking>", "</thinking>", "<rethink>", "</rethink>", "<answer>", "</answer>")
EVIDENCE_KEYS = ("text_keywords", "bbox_2d", "key_frames")
CHECKS = ("strict", "tags")
COORD_MAX = 1000  # Qwen-VL's relative box coordinates

#: every reason a T-CoT can fail, in the order they are checked ("" = well formed)
REASONS = (
    "not_text",  # the input is not a str
    "missing_tag",  # one of the six tags is absent ("tags": the ordered sequence is absent)
    "duplicate_tag",  # a tag occurs more than once
    "tags_out_of_order",
    "text_outside_blocks",  # non-whitespace before, between or after the three blocks
    "empty_block",  # blank <rethink> or <answer>
    "no_evidence",  # no JSON object in <thinking>, or one without an evidence key
    "bad_json",  # the first "{" in <thinking> does not start a JSON object (NaN/Infinity count as bad)
    "multiple_evidence",  # another "{" after the evidence object
    "unknown_evidence_key",
    "multiple_evidence_keys",
    "wrong_evidence_kind",  # not the kind the input asks for (``expected``)
    "bad_keywords",  # text_keywords not a non-empty list of non-blank strings
    "bbox_malformed",  # not a box [x1, y1, x2, y2] of numbers, nor a non-empty list of such boxes
    "bbox_out_of_range",  # a coordinate outside [0, 1000]
    "bbox_empty",  # x1 >= x2 or y1 >= y2
    "key_frames_malformed",  # not a non-empty list of integers
    "key_frames_without_video",  # key frames, but the input has no frame count
    "key_frame_out_of_range",  # outside [base, base + num_frames - 1]
)


#: how the strict check treats the evidence kind: "modality" = the side's (`expected_evidence`), "any" = any kind
EVIDENCE_CHECKS = ("modality", "any")


def expected_evidence(side: dict) -> str:
    """The evidence kind the official prompts ask of a side (``{"text", "image", "video", ...}``):
    ``key_frames`` with a video, else ``bbox_2d`` with an image, else ``text_keywords``."""
    if side.get("video") is not None:
        return "key_frames"
    if side.get("image") is not None:
        return "bbox_2d"
    return "text_keywords"


@dataclasses.dataclass(frozen=True)
class TCoT:
    """One parsed T-CoT. ``ok`` iff ``reason == ""``; the fields hold what was parsed before any failure."""

    reason: str = ""
    thinking: str = ""
    rethink: str = ""
    answer: str = ""
    evidence_kind: str = ""  # one of EVIDENCE_KEYS ("" when absent or not checked)
    keywords: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    frames: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason == ""


def _ordered_blocks(text: str) -> tuple[str, str, str] | None:
    """The official check's leftmost match: each tag found after the previous one (earliest
    occurrences are optimal for an ordered subsequence, so this equals the regex's groups)."""
    pos, marks = 0, []
    for tag in TAGS:
        i = text.find(tag, pos)
        if i < 0:
            return None
        marks.append((i, i + len(tag)))
        pos = i + len(tag)
    return tuple(text[marks[k][1] : marks[k + 1][0]] for k in (0, 2, 4))


def _reject_constant(name: str):
    raise ValueError(f"non-finite JSON constant {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _boxes(value) -> tuple[str, tuple]:
    """(reason, boxes) of a ``bbox_2d`` value: one box or a non-empty list of boxes."""
    if isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        return "bbox_malformed", ()
    if not all(isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b) for b in value):
        return "bbox_malformed", ()
    boxes = tuple(tuple(float(v) for v in b) for b in value)
    if any(not 0 <= v <= COORD_MAX for b in boxes for v in b):
        return "bbox_out_of_range", boxes
    if any(b[0] >= b[2] or b[1] >= b[3] for b in boxes):
        return "bbox_empty", boxes
    return "", boxes


def _evidence(thinking: str, expected: str | None, num_frames: int | None, frame_base: int) -> dict:
    start = thinking.find("{")
    if start < 0:
        return {"reason": "no_evidence"}
    try:
        obj, end = _DECODER.raw_decode(thinking, start)
    except (ValueError, RecursionError):
        return {"reason": "bad_json"}
    if "{" in thinking[end:]:
        return {"reason": "multiple_evidence"}
    unknown = [k for k in obj if k not in EVIDENCE_KEYS]
    if unknown:
        return {"reason": "unknown_evidence_key"}
    if not obj:
        return {"reason": "no_evidence"}
    if len(obj) > 1:
        return {"reason": "multiple_evidence_keys"}
    kind, value = next(iter(obj.items()))
    out = {"evidence_kind": kind}
    if expected is not None and kind != expected:
        return {**out, "reason": "wrong_evidence_kind"}
    if kind == "text_keywords":
        good = isinstance(value, list) and bool(value) and all(isinstance(w, str) and w.strip() for w in value)
        return {**out, "reason": "" if good else "bad_keywords", "keywords": tuple(value) if good else ()}
    if kind == "bbox_2d":
        reason, boxes = _boxes(value)
        return {**out, "reason": reason, "boxes": boxes}
    if not (isinstance(value, list) and value and all(_is_int(k) for k in value)):
        return {**out, "reason": "key_frames_malformed"}
    out["frames"] = tuple(value)
    if num_frames is None:
        return {**out, "reason": "key_frames_without_video"}
    if any(not frame_base <= k < frame_base + num_frames for k in value):
        return {**out, "reason": "key_frame_out_of_range"}
    return {**out, "reason": ""}


def parse_tcot(
    text,
    *,
    check: str = "strict",
    expected: str | None = None,
    num_frames: int | None = None,
    frame_base: int = 1,
) -> TCoT:
    """Parse one decoded response.

    Args:
      text: the decoded response (anything that is not a ``str`` gives ``not_text``).
      check: ``"strict"`` or ``"tags"`` (the official check; see the module docstring).
      expected: the evidence kind the input asks for (``"text_keywords"`` for text, ``"bbox_2d"`` for an
        image, ``"key_frames"`` for a video) or None for any kind. Strict only.
      num_frames: the video's frame count (None: no video; then key frames are refused). Strict only.
      frame_base: index of the first frame in ``key_frames`` (Embed-RL's prompt: 1-based).
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {list(CHECKS)}, got {check!r}")
    if expected is not None and expected not in EVIDENCE_KEYS:
        raise ValueError(f"expected must be None or one of {list(EVIDENCE_KEYS)}, got {expected!r}")
    if not isinstance(text, str):
        return TCoT(reason="not_text")
    if check == "tags":
        blocks = _ordered_blocks(text)
        if blocks is None:
            return TCoT(reason="missing_tag")
        return TCoT(thinking=blocks[0], rethink=blocks[1], answer=blocks[2])
    counts = [text.count(tag) for tag in TAGS]
    if min(counts) == 0:
        return TCoT(reason="missing_tag")
    if max(counts) > 1:
        return TCoT(reason="duplicate_tag")
    at = [text.index(tag) for tag in TAGS]
    if at != sorted(at):
        return TCoT(reason="tags_out_of_order")
    ends = [i + len(tag) for i, tag in zip(at, TAGS)]
    thinking, rethink, answer = (text[ends[k] : at[k + 1]] for k in (0, 2, 4))
    parsed = TCoT(thinking=thinking, rethink=rethink, answer=answer)
    outside = (text[: at[0]], text[ends[1] : at[2]], text[ends[3] : at[4]], text[ends[5] :])
    if any(s.strip() for s in outside):
        return dataclasses.replace(parsed, reason="text_outside_blocks")
    if not rethink.strip() or not answer.strip():
        return dataclasses.replace(parsed, reason="empty_block")
    return dataclasses.replace(parsed, **_evidence(thinking, expected, num_frames, frame_base))


def format_flags(
    texts: Sequence,
    *,
    check: str = "strict",
    expected: Sequence[str | None] | None = None,
    num_frames: Sequence[int | None] | None = None,
    frame_base: int = 1,
) -> tuple[np.ndarray, Counter]:
    """Per-response format flags (float32 ``[N]``, 1 = well formed) and a Counter of failure reasons.

    ``expected`` / ``num_frames``: one entry per response (None: no constraint / no video)."""
    n = len(texts)
    expected = [None] * n if expected is None else list(expected)
    num_frames = [None] * n if num_frames is None else list(num_frames)
    if len(expected) != n or len(num_frames) != n:
        raise ValueError(f"{n} responses but {len(expected)} expected kinds and {len(num_frames)} frame counts")
    parsed = [
        parse_tcot(t, check=check, expected=e, num_frames=f, frame_base=frame_base)
        for t, e, f in zip(texts, expected, num_frames)
    ]
    flags = np.array([p.ok for p in parsed], np.float32)
    return flags, Counter(p.reason for p in parsed if not p.ok)
