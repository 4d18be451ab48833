"""A small, seeded multi-grain retrieval dataset written in M-BEIR layout (dataset id 10, "multigrain").

A *scene* is 1-3 objects on a light background, each in its own cell of a 3x3 grid. Its *grains*:
per object colour (6), shape (4), size (2), position (9 cells); plus the object count. Captions name
every grain, e.g. ``"two shapes: a small red circle at the top left and a large blue square at the
bottom"`` (objects in reading order). A *one-grain variant* changes one attribute of one object, or
adds/removes one object (count). Every scene in a dataset (both splits, variants included) is unique, so
a variant is never a second positive, and hard negatives (``neg_cand_list``) differ from the positive in
exactly one grain.

Per base scene S (``n_train`` / ``n_test`` per split; one query per task), with K = 3 variants N_k(S):

- task 0 t->i: caption(S) -> image of S; negatives: images of N_k(S).
- task 1 t->t: paraphrase(S) -> caption(S); negatives: captions of N_k(S).
- task 3 i->t: image of S -> caption(S); negatives: captions of N_k(S).
- task 4 i->i: image of S -> another rendering of S (jitter, background, colour noise, size); negatives:
  images of N_k(S).
- task 7 (i,t)->i: image of S + edit text ("make the small red circle at the top left blue") -> image of
  T = N_1(S); negatives: a rendering of S (edit ignored) and images of two variants of T.

Layout under ``root`` (see README.md next to this file; ``{t}`` is the task id)::

    query/{train,test}/mbeir_multigrain_task{t}_{split}.jsonl, query/train/mbeir_multigrain_union_train.jsonl
    cand_pool/local/mbeir_multigrain_task{t}_cand_pool.jsonl           test candidates of task t
    cand_pool/global/mbeir_multigrain_union_{train,test}_cand_pool.jsonl
    qrels/test/mbeir_multigrain_task{t}_test_qrels.txt
    instructions/query_instructions.tsv
    images/multigrain/{split}/{scene_id}_r{k}.png                       84..112 px per side
    mrbench/...                  MRBench-style subset (tasks 0, 3, 4, 7; query scene with >= 2 objects)
    nli/multigrain_nli_train.csv sent0 = caption, sent1 = paraphrase, hard_neg = one-grain variant caption
    meta/scenes.jsonl, meta/candidates.jsonl (did -> scene), meta/query_grains.jsonl, meta/summary.json

``meta/query_grains.jsonl`` lists, per qid, the grain phrases with kind, object index, role and the
character span in ``text`` (the query text, or the query scene's caption for image-only queries).
Output is byte-identical for the same seed and sizes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

from elva_jax.data.progress import Progress
from elva_jax.errors import UserError

__all__ = [
    "COLOURS",
    "DATASET_ID",
    "GRAIN_KINDS",
    "MRBENCH_TASKS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TASKS",
    "Obj",
    "caption",
    "ensure_generated",
    "generate",
    "main",
]

DATASET_ID = 10
DATASET_NAME = "multigrain"
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
#: 3x3 grid cells in reading order; index = 3 * row + col.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GRAIN_KINDS = ("colour", "shape", "size", "position", "count")
MAX_OBJECTS = 3
N_HARD_NEGATIVES = 3
N_EDIT_NEGATIVES = 2  # variants of the edit target (plus the unedited scene) in task 7
#: task id -> (query modality, candidate modality)
TASKS = {
    0: ("text", "image"),
    1: ("text", "text"),
    3: ("image", "text"),
    4: ("image", "image"),
    7: ("image,text", "image"),
}
MRBENCH_TASKS = (0, 3, 4, 7)
IMAGE_SIDES = (84, 98, 112)

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
_INSTRUCTIONS = {
    0: (
        "Find an image that matches the given description of shapes.",
        "Retrieve the picture showing exactly the shapes described.",
        "Identify the image whose colours, shapes, sizes and positions match the caption.",
    ),
    1: (
        "Find a caption that describes the same arrangement of shapes.",
        "Retrieve the sentence describing the same shapes in the same places.",
        "Identify a description equivalent to the given one.",
    ),
    3: (
        "Find a caption describing every shape in this image.",
        "Retrieve the description that matches the colours, shapes, sizes and positions shown.",
        "Identify the caption of this picture.",
    ),
    4: (
        "Find another picture of the same shapes in the same places.",
        "Retrieve an image showing the same scene as this one.",
        "Identify the image with identical shapes, colours, sizes and positions.",
    ),
    7: (
        "Apply the requested change to the image and find the resulting picture.",
        "Retrieve the image that shows this picture after the described edit.",
        "Identify the edited version of the image.",
    ),
}


class Obj(NamedTuple):
    """One object of a scene (all four fields are grains)."""

    colour: str
    shape: str
    size: str
    position: str


Scene = tuple[Obj, ...]  # sorted by position index, positions distinct


def _sorted(objects: Iterable[Obj]) -> Scene:
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


# ----------------------------------------------------------------------------------------------------
# texts as segments: plain strings and grain pieces (phrase, kind, object index or None, role)


class _Grain(NamedTuple):
    phrase: str
    kind: str
    obj: int | None
    role: str


def _render_segments(segments: Sequence[str | _Grain]) -> tuple[str, list[dict]]:
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


def _caption_segments(scene: Scene) -> list[str | _Grain]:
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
    return _render_segments(_caption_segments(scene))[0]


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


def _paraphrase_segments(scene: Scene, rng: random.Random) -> list[str | _Grain]:
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


def _edit_segments(source: Scene, target: Scene, edit: dict) -> list[str | _Grain]:
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


# ----------------------------------------------------------------------------------------------------
# scenes and one-grain variants


def _random_object(rng: random.Random, free: Sequence[str]) -> Obj:
    return Obj(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(tuple(free)))


def _random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(POSITIONS, n)
    return _sorted(_random_object(rng, [p]) for p in positions)


def _variant(scene: Scene, kind: str, rng: random.Random) -> tuple[Scene, dict]:
    """Change exactly one grain -> (new scene, edit record). ``object`` indexes ``scene`` (None when an
    object is added); ``target_object`` indexes the new scene (None when one is removed)."""
    objs = list(scene)
    if kind == "count":
        add = len(objs) == 1 or (len(objs) < MAX_OBJECTS and rng.random() < 0.5)
        if add:
            new = _random_object(rng, [p for p in POSITIONS if p not in {o.position for o in objs}])
            target = _sorted([*objs, new])
            return target, {
                "kind": "count",
                "object": None,
                "target_object": target.index(new),
                "old": len(objs),
                "new": "add",
            }
        i = rng.randrange(len(objs))
        target = _sorted(objs[:i] + objs[i + 1 :])
        return target, {"kind": "count", "object": i, "target_object": None, "old": len(objs), "new": "remove"}
    i = rng.randrange(len(objs))
    old = getattr(objs[i], kind)
    if kind == "position":
        choices = [p for p in POSITIONS if p not in {o.position for o in objs}]
    else:
        choices = [v for v in {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}[kind] if v != old]
    new_value = rng.choice(choices)
    changed = objs[i]._replace(**{kind: new_value})
    target = _sorted(objs[:i] + [changed] + objs[i + 1 :])
    return target, {"kind": kind, "object": i, "target_object": target.index(changed), "old": old, "new": new_value}


def _fresh_variants(scene: Scene, k: int, rng: random.Random, seen: set[Scene]) -> list[tuple[Scene, dict]]:
    """k one-grain variants of ``scene``, new to ``seen`` (which is updated), kinds distinct while possible."""
    out: list[tuple[Scene, dict]] = []
    kinds = rng.sample(GRAIN_KINDS, len(GRAIN_KINDS))
    for attempt in range(200):
        kind = kinds[(len(out) + attempt) % len(kinds)]
        new, edit = _variant(scene, kind, rng)
        if new in seen:
            continue
        seen.add(new)
        out.append((new, edit))
        if len(out) == k:
            return out
    raise RuntimeError(f"could not find {k} fresh variants of {scene}")


def _render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw a scene: random size in IMAGE_SIDES, light background, jittered centres, colour noise."""
    width, height = rng.choice(IMAGE_SIDES), rng.choice(IMAGE_SIDES)
    grey = rng.randint(228, 255)
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width / 3, height / 3
    cell = min(cell_w, cell_h)
    for o in scene:
        row, col = divmod(POSITIONS.index(o.position), 3)
        cx = (col + 0.5) * cell_w + rng.uniform(-0.06, 0.06) * cell
        cy = (row + 0.5) * cell_h + rng.uniform(-0.06, 0.06) * cell
        r = cell * (0.40 if o.size == "large" else 0.21)
        fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        elif o.shape == "square":
            s = 0.85 * r
            draw.rectangle([round(cx - s), round(cy - s), round(cx + s), round(cy + s)], fill=fill)
        elif o.shape == "triangle":
            pts = [(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)]
            draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
        else:  # diamond
            pts = [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
            draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
    return image


# ----------------------------------------------------------------------------------------------------
# the writer


class _Builder:
    """Accumulates scenes, renderings, candidates and queries in a fixed order."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.seen: set[Scene] = set()
        self.scenes: dict[str, dict] = {}
        self.scene_of: dict[Scene, str] = {}
        self.candidates: dict[str, dict] = {}  # did -> pool record
        self.cand_meta: list[dict] = []
        self.text_did: dict[str, str] = {}  # scene id -> did of its caption
        self.n_images = 0
        self.progress: Progress | None = None  # periodic line on large sets (none within the first 10 s)
        self.queries: dict[str, dict[int, list[dict]]] = {}
        self.grains: list[dict] = []
        self.nli_rows: list[tuple[str, str, str]] = []
        self._qid = self._did = 0
        self.seed = 0  # summaries draw from their own stream (seed, scene id): the rest stays byte-identical

    def add_scene(self, scene: Scene, split: str, role: str, parent: str | None, edit: dict | None) -> str:
        sid = f"s{len(self.scenes) + 1:05d}"
        self.seen.add(scene)
        self.scene_of[scene] = sid
        self.scenes[sid] = {
            "scene_id": sid,
            "split": split,
            "role": role,
            "parent": parent,
            "edit": edit,
            "objects": [o._asdict() for o in scene],
            "caption": caption(scene),
            "paraphrase": _render_segments(_paraphrase_segments(scene, self.rng))[0],
        }
        return sid

    def image(self, sid: str, split: str, k: int) -> str:
        """Render scene ``sid`` (rendering k) to PNG; return its path relative to the root."""
        rel = f"images/{DATASET_NAME}/{split}/{sid}_r{k}.png"
        scene = _sorted(Obj(**o) for o in self.scenes[sid]["objects"])
        buf = io.BytesIO()
        _render(scene, self.rng).save(buf, format="PNG")
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(buf.getvalue())
        self.n_images += 1
        if self.progress is not None:
            self.progress.update()
        return rel

    def summaries(self, sid: str) -> list[str]:
        """Target summaries of scene ``sid`` (the same list wherever the scene appears)."""
        scene = _sorted(Obj(**o) for o in self.scenes[sid]["objects"])
        return summary_variants(scene, random.Random(f"{self.seed}:{sid}"))

    def _new_did(self, record: dict, sid: str, rendering: int | None) -> str:
        self._did += 1
        did = f"{DATASET_ID}:{self._did}"
        src = {"scene_id": sid, "summary": self.summaries(sid)}
        self.candidates[did] = {"did": did, **record, "src_content": json.dumps(src)}
        self.cand_meta.append({"did": did, "scene_id": sid, "modality": record["modality"], "rendering": rendering})
        return did

    def image_candidate(self, sid: str, split: str, k: int) -> str:
        rel = self.image(sid, split, k)
        return self._new_did({"txt": None, "img_path": rel, "modality": "image"}, sid, k)

    def text_candidate(self, sid: str) -> str:
        if sid not in self.text_did:
            record = {"txt": self.scenes[sid]["caption"], "img_path": None, "modality": "text"}
            self.text_did[sid] = self._new_did(record, sid, None)
        return self.text_did[sid]

    def query(self, split: str, task: int, *, txt, img, pos, negs, sid, target, grain_text, grains) -> None:
        self._qid += 1
        qid = f"{DATASET_ID}:{self._qid}"
        self.queries.setdefault(split, {}).setdefault(task, []).append(
            {
                "qid": qid,
                "query_txt": txt,
                "query_img_path": img,
                "query_modality": TASKS[task][0],
                # the summary describes what the query asks for: the target scene (task 7's edited one)
                "query_src_content": json.dumps(
                    {"scene_id": sid, "target_scene_id": target, "summary": self.summaries(target)}
                ),
                "pos_cand_list": pos,
                "neg_cand_list": negs,
                "task_id": task,
            }
        )
        self.grains.append(
            {
                "qid": qid,
                "split": split,
                "task_id": task,
                "query_scene": sid,
                "target_scene": target,
                "n_objects": len(self.scenes[sid]["objects"]),
                "text": grain_text[0],
                "text_field": grain_text[1],
                "grains": grains,
            }
        )


def _build_split(b: _Builder, split: str, n: int) -> None:
    rng = b.rng
    per_scene: list[dict] = []
    for _ in range(n):
        scene = _random_scene(rng)
        while scene in b.seen:
            scene = _random_scene(rng)
        sid = b.add_scene(scene, split, "base", None, None)
        variants = [
            b.add_scene(v, split, "variant", sid, e) for v, e in _fresh_variants(scene, N_HARD_NEGATIVES, rng, b.seen)
        ]
        target_sid = variants[0]
        target = _sorted(Obj(**o) for o in b.scenes[target_sid]["objects"])
        edit_negs = [
            b.add_scene(v, split, "edit_variant", target_sid, e)
            for v, e in _fresh_variants(target, N_EDIT_NEGATIVES, rng, b.seen)
        ]
        per_scene.append(
            {
                "sid": sid,
                "scene": scene,
                "variants": variants,
                "target": target_sid,
                "edit_negs": edit_negs,
                "query_img": b.image(sid, split, 0),
                "pos_img": b.image_candidate(sid, split, 1),
                # variants[0] is the task-7 edit target: a negative for tasks 0/4, the positive of task 7.
                "var_imgs": [b.image_candidate(v, split, 0) for v in variants],
                "edit_neg_imgs": [b.image_candidate(v, split, 0) for v in edit_negs],
                "pos_txt": b.text_candidate(sid),
                "var_txts": [b.text_candidate(v) for v in variants],
            }
        )
        per_scene[-1]["target_img"] = per_scene[-1]["var_imgs"][0]
        if split == "train":  # NLI pairs from the training scenes only
            for v in variants:
                paraphrase = _render_segments(_paraphrase_segments(scene, rng))[0]
                b.nli_rows.append((b.scenes[sid]["caption"], paraphrase, b.scenes[v]["caption"]))

    for task in TASKS:
        for s in per_scene:
            sid = s["sid"]
            cap_text, cap_grains = _render_segments(_caption_segments(s["scene"]))
            txt, img, target, grain_field = None, s["query_img"], sid, "caption"
            text, grains = cap_text, cap_grains
            if task == 0:  # caption -> image
                txt, img, grain_field = cap_text, None, "query_txt"
                pos, negs = s["pos_img"], s["var_imgs"]
            elif task == 1:  # paraphrase -> caption
                text, grains = _render_segments(_paraphrase_segments(s["scene"], rng))
                txt, img, grain_field = text, None, "query_txt"
                pos, negs = s["pos_txt"], s["var_txts"]
            elif task == 3:  # image -> caption
                pos, negs = s["pos_txt"], s["var_txts"]
            elif task == 4:  # image -> other rendering
                pos, negs = s["pos_img"], s["var_imgs"]
            else:  # image + edit text -> edited scene; the unedited scene is a negative
                tgt = b.scenes[s["target"]]
                tgt_scene = _sorted(Obj(**o) for o in tgt["objects"])
                text, grains = _render_segments(_edit_segments(s["scene"], tgt_scene, tgt["edit"]))
                txt, target, grain_field = text, s["target"], "query_txt"
                pos, negs = s["target_img"], [s["pos_img"], *s["edit_neg_imgs"]]
            b.query(
                split,
                task,
                txt=txt,
                img=img,
                pos=[pos],
                negs=negs,
                sid=sid,
                target=target,
                grain_text=(text, grain_field),
                grains=grains,
            )


def _jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _text(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _did_order(did: str) -> int:
    return int(did.split(":")[1])


#: written last by `generate`: the files it wrote (one relative path a line); `--overwrite` deletes only those
GENERATED_MARKER = "ELVA_GENERATED"


class GeneratorTargetError(UserError, FileExistsError):
    """The output directory holds data this generator did not write."""


def generate(root: str | Path, *, seed: int = 0, n_train: int = 32, n_test: int = 16, overwrite: bool = False) -> dict:
    """Write the dataset under ``root``; return a summary dict (counts, relative paths, ``root``).

    ``n_train`` / ``n_test`` = base scenes per split = queries per task per split. Each base scene costs
    7 PNGs (defaults: 336 images, about a second). ``root`` must be empty or absent, unless
    ``overwrite`` and ``root`` holds an earlier output of this generator: then exactly the files that
    output wrote (listed in its ``ELVA_GENERATED`` marker) are deleted first; anything else stays.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    root = Path(root)
    marker = root / GENERATED_MARKER
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise GeneratorTargetError(f"{root} is not empty (pass overwrite=True / --overwrite)")
        if not marker.is_file():
            raise GeneratorTargetError(
                f"{root} is not empty and holds no {GENERATED_MARKER} marker: not an output of this generator, "
                "so --overwrite deletes nothing there; choose an empty directory"
            )
        for rel in marker.read_text(encoding="utf-8").splitlines():
            if rel and (root / rel).is_file():
                (root / rel).unlink()
        marker.unlink()
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()
    root.mkdir(parents=True, exist_ok=True)
    before = {p for p in root.rglob("*") if p.is_file()}
    b = _Builder(root, random.Random(seed))
    b.seed = seed
    b.progress = Progress("generate bundled images", total=7 * (n_train + n_test), unit="images")
    _build_split(b, "train", n_train)
    _build_split(b, "test", n_test)

    name = f"mbeir_{DATASET_NAME}"
    pools: dict[int, list[str]] = {}
    for task, queries in b.queries["test"].items():
        dids = {d for q in queries for d in q["pos_cand_list"] + q["neg_cand_list"]}
        pools[task] = sorted(dids, key=_did_order)
    train_dids = sorted(
        {d for qs in b.queries["train"].values() for q in qs for d in q["pos_cand_list"] + q["neg_cand_list"]},
        key=_did_order,
    )
    test_dids = sorted({d for p in pools.values() for d in p}, key=_did_order)

    def qrels_lines(queries: list[dict]) -> list[str]:
        return [f"{q['qid']} 0 {d} 1 {q['task_id']}" for q in queries for d in q["pos_cand_list"]]

    for split, by_task in b.queries.items():
        for task, queries in by_task.items():
            _jsonl(root / "query" / split / f"{name}_task{task}_{split}.jsonl", queries)
    _jsonl(
        root / "query" / "train" / f"{name}_union_train.jsonl", (q for qs in b.queries["train"].values() for q in qs)
    )
    for task, dids in pools.items():
        _jsonl(root / "cand_pool" / "local" / f"{name}_task{task}_cand_pool.jsonl", (b.candidates[d] for d in dids))
        _text(root / "qrels" / "test" / f"{name}_task{task}_test_qrels.txt", qrels_lines(b.queries["test"][task]))
    _jsonl(root / "cand_pool" / "global" / f"{name}_union_train_cand_pool.jsonl", (b.candidates[d] for d in train_dids))
    _jsonl(root / "cand_pool" / "global" / f"{name}_union_test_cand_pool.jsonl", (b.candidates[d] for d in test_dids))

    header = "\t".join(["query_modality", "cand_modality", "dataset", "dataset_id", "prompt_1", "prompt_2", "prompt_3"])
    rows = [header] + ["\t".join([*TASKS[t], DATASET_NAME, str(DATASET_ID), *_INSTRUCTIONS[t]]) for t in TASKS]
    _text(root / "instructions" / "query_instructions.tsv", rows)

    # MRBench-style subset: tasks 0, 3, 4, 7; query scene with >= 2 objects; full local pools.
    multi = {g["qid"] for g in b.grains if g["split"] == "test" and g["n_objects"] >= 2}
    mrbench_counts = {}
    for task in MRBENCH_TASKS:
        queries = [q for q in b.queries["test"][task] if q["qid"] in multi]
        mrbench_counts[task] = len(queries)
        _jsonl(root / "mrbench" / "query" / "test" / f"{name}_task{task}_test.jsonl", queries)
        _jsonl(
            root / "mrbench" / "cand_pool" / "local" / f"{name}_task{task}_cand_pool.jsonl",
            (b.candidates[d] for d in pools[task]),
        )
        _text(root / "mrbench" / "qrels" / "test" / f"{name}_task{task}_test_qrels.txt", qrels_lines(queries))

    (root / "nli").mkdir(parents=True, exist_ok=True)
    with open(root / "nli" / f"{DATASET_NAME}_nli_train.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sent0", "sent1", "hard_neg"])
        writer.writerows(b.nli_rows)

    _jsonl(root / "meta" / "scenes.jsonl", b.scenes.values())
    _jsonl(root / "meta" / "candidates.jsonl", b.cand_meta)
    _jsonl(root / "meta" / "query_grains.jsonl", b.grains)
    summary = {
        "dataset": DATASET_NAME,
        "dataset_id": DATASET_ID,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "n_scenes": len(b.scenes),
        "n_images": b.n_images,
        "n_candidates": len(b.candidates),
        "queries": {split: {str(t): len(qs) for t, qs in by_task.items()} for split, by_task in b.queries.items()},
        "local_pool_sizes": {str(t): len(p) for t, p in pools.items()},
        "mrbench_queries": {str(t): n for t, n in mrbench_counts.items()},
        "nli_rows": len(b.nli_rows),
    }
    summary["files"] = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".png"
    ) + ["meta/summary.json"]
    (root / "meta" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in before)
    marker.write_text("\n".join(written) + "\n", encoding="utf-8")
    return {**summary, "root": str(root)}


class BundledSizeError(UserError, ValueError):
    """An existing bundled set was generated with other sizes than the run asks for."""


def ensure_generated(root: str | Path, *, n_train: int = 32, n_test: int = 16, announce: bool = False) -> Path:
    """The bundled set under ``root``: generated (seed 0) when ``root`` holds none, else checked to have
    ``n_train`` / ``n_test`` base scenes (an existing set of other sizes is refused, never overwritten)."""
    root = Path(root)
    summary = root / "meta" / "summary.json"
    if not summary.is_file():
        if announce:
            print(f"[elva_jax] {root} has no bundled data: generating the synthetic bundled set there", flush=True)
        generate(root, seed=0, n_train=n_train, n_test=n_test)
        return root
    have = json.loads(summary.read_text(encoding="utf-8"))
    if (have.get("n_train"), have.get("n_test")) != (n_train, n_test):
        raise BundledSizeError(
            f"{summary}: this bundled set has {have.get('n_train')} train / {have.get('n_test')} test scenes, the "
            f"run asks for {n_train} / {n_test} (data.bundled_train_scenes / data.bundled_test_scenes): use another "
            "data.root or run.dir, or the sizes it was made with"
        )
    return root


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m elva_jax.data.multigrain --out DIR [--seed S] [--n-train N] [--n-test N] [--overwrite]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root (empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=32, help="base scenes (queries per task) in train")
    parser.add_argument("--n-test", type=int, default=16, help="base scenes (queries per task) in test")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in --out")
    args = parser.parse_args(argv)
    summary = generate(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=1))
    return summary


if __name__ == "__main__":
    from elva_jax.errors import cli

    cli(main, prog="python -m elva_jax.data.multigrain")
