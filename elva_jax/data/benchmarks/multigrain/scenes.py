"""Scenes of the bundled multi-grain set: grains (colour, shape, size, position; count), random scenes,
one-grain variants and their rendering to images."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "GRAIN_KINDS",
    "IMAGE_SIDES",
    "MAX_OBJECTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "fresh_variants",
    "random_scene",
    "render",
    "sorted_scene",
]

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
IMAGE_SIDES = (84, 98, 112)


class Obj(NamedTuple):
    """One object of a scene (all four fields are grains)."""

    colour: str
    shape: str
    size: str
    position: str


Scene = tuple[Obj, ...]  # sorted by position index, positions distinct


def sorted_scene(objects: Iterable[Obj]) -> Scene:
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


# ----------------------------------------------------------------------------------------------------
# scenes and one-grain variants


def _random_object(rng: random.Random, free: Sequence[str]) -> Obj:
    return Obj(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(tuple(free)))


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(POSITIONS, n)
    return sorted_scene(_random_object(rng, [p]) for p in positions)


def _variant(scene: Scene, kind: str, rng: random.Random) -> tuple[Scene, dict]:
    """Change exactly one grain -> (new scene, edit record). ``object`` indexes ``scene`` (None when an
    object is added); ``target_object`` indexes the new scene (None when one is removed)."""
    objs = list(scene)
    if kind == "count":
        add = len(objs) == 1 or (len(objs) < MAX_OBJECTS and rng.random() < 0.5)
        if add:
            new = _random_object(rng, [p for p in POSITIONS if p not in {o.position for o in objs}])
            target = sorted_scene([*objs, new])
            return target, {
                "kind": "count",
                "object": None,
                "target_object": target.index(new),
                "old": len(objs),
                "new": "add",
            }
        i = rng.randrange(len(objs))
        target = sorted_scene(objs[:i] + objs[i + 1 :])
        return target, {"kind": "count", "object": i, "target_object": None, "old": len(objs), "new": "remove"}
    i = rng.randrange(len(objs))
    old = getattr(objs[i], kind)
    if kind == "position":
        choices = [p for p in POSITIONS if p not in {o.position for o in objs}]
    else:
        choices = [v for v in {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}[kind] if v != old]
    new_value = rng.choice(choices)
    changed = objs[i]._replace(**{kind: new_value})
    target = sorted_scene(objs[:i] + [changed] + objs[i + 1 :])
    return target, {"kind": kind, "object": i, "target_object": target.index(changed), "old": old, "new": new_value}


def fresh_variants(scene: Scene, k: int, rng: random.Random, seen: set[Scene]) -> list[tuple[Scene, dict]]:
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


def render(scene: Scene, rng: random.Random) -> Image.Image:
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
