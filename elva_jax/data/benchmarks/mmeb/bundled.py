"""A small, seeded MMEB-format set written offline as HF datasets (``save_to_disk``; one task as parquet).

Images are 1-2 coloured shapes on a light background; documents are 84x112 pages of a title and drawn lines;
videos are 8-frame 64x64 mp4 clips (PyAV, libx264) of a coloured square moving in one direction.
Tasks (names, parser and meta-task in ``mmeb_tasks.json``):

- image CLS ``Bundled-ColourCLS`` (image_cls): image -> its colour among the 6 colour names.
- image QA ``Bundled-ShapeQA`` (image_qa, parquet): image + "What shape is shown?" -> shape name.
- image RET ``Bundled-T2I`` (image_t2i): caption -> image among 4; ``Bundled-I2T`` (image_i2t): image ->
  caption among 4.
- image VG ``Bundled-Grounding`` (image_i2i_vg): two-object image + "the red circle" -> crop among 3.
- visual documents ``Bundled-DocRetrieval`` (vidore): queries -> a corpus of 8 page images (embedded
  bytes), BEIR qrels with graded scores (1, 2), two relevant pages for some queries, one score-0 row.
- video CLS ``Bundled-VideoMotion`` (video_classification, global over 4 direction labels) and video RET
  ``Bundled-VideoRET`` (msrvtt: caption -> clip).
- video MRET ``Bundled-MomentRET`` (moment_retrieval): two 12-frame videos stored as frame folders (PNG),
  each three 4-frame segments of a differently coloured square moving one way; query: a segment's caption
  + the whole video; candidates: the video's three segments (frame folders), the captioned one positive.

    python -m elva_jax.data.benchmarks.mmeb.bundled --out DIR [--seed S]

Output is the same for the same seed (images and clips from seeded random draws).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from elva_jax.errors import UserError, cli

__all__ = ["COLOURS", "SHAPES", "TASKS", "generate"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SIDE = 84
MARKER = "ELVA_MMEB_GENERATED"
TASKS = [
    {"name": "Bundled-ColourCLS", "modality": "image", "meta_task": "CLS", "parser": "image_cls"},
    {"name": "Bundled-ShapeQA", "modality": "image", "meta_task": "QA", "parser": "image_qa"},
    {"name": "Bundled-T2I", "modality": "image", "meta_task": "RET", "parser": "image_t2i"},
    {"name": "Bundled-I2T", "modality": "image", "meta_task": "RET", "parser": "image_i2t"},
    {"name": "Bundled-Grounding", "modality": "image", "meta_task": "VG", "parser": "image_i2i_vg"},
    {"name": "Bundled-DocRetrieval", "modality": "visdoc", "meta_task": "VDRv1", "parser": "vidore"},
    {
        "name": "Bundled-VideoMotion",
        "modality": "video",
        "meta_task": "CLS",
        "parser": "video_classification",
        "labels": [f"moving {d}" for d in DIRECTIONS],
        "query_instruction": "Recognize the motion in the video.",
    },
    {"name": "Bundled-VideoRET", "modality": "video", "meta_task": "RET", "parser": "msrvtt"},
    {"name": "Bundled-MomentRET", "modality": "video", "meta_task": "MRET", "parser": "moment_retrieval"},
]


class GeneratorTargetError(UserError, FileExistsError):
    """The output directory holds data this generator did not write."""


def _draw(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _image(objs: Sequence[tuple[str, str, tuple]], rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    im = Image.new("RGB", (SIDE, SIDE), bg)
    d = ImageDraw.Draw(im)
    for colour, shape, box in objs:
        _draw(d, shape, box, COLOURS[colour])
    return im


def _one(rng: random.Random, colour: str, shape: str) -> Image.Image:
    s = rng.randint(30, 50)
    x, y = rng.randint(4, SIDE - s - 4), rng.randint(4, SIDE - s - 4)
    return _image([(colour, shape, (x, y, x + s, y + s))], rng)


def _save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def _dataset(rows: dict, out: Path, *, parquet: bool = False, features=None) -> None:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict(rows, features=features)
    if parquet:
        out.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out / "test-00000-of-00001.parquet"))
    else:
        ds.save_to_disk(str(out))


def _image_tasks(root: Path, rng: random.Random, n: int) -> None:
    img_root = root / "image-tasks"
    names = list(COLOURS)
    empty = {"qry_inst": [], "qry_text": [], "qry_img_path": [], "tgt_inst": [], "tgt_text": [], "tgt_img_path": []}
    cls, qa, t2i, i2t, vg = (json.loads(json.dumps(empty)) for _ in range(5))

    def add(t, qi, qt, qp, ti, tt, tp):
        for k, v in zip(empty, (qi, qt, qp, ti, tt, tp)):
            t[k].append(v)

    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[i % len(SHAPES)]
        p = f"bundled/cls/{i}.png"
        _save(_one(rng, colour, shape), img_root / p)
        others = [c for c in names if c != colour]
        add(
            cls,
            "<|image_1|> Represent the given image for classification",
            "",
            p,
            "",
            [colour] + others,
            [""] * len(names),
        )
        shapes = [shape] + [s for s in SHAPES if s != shape]
        add(
            qa,
            "<|image_1|> Represent the given image with the following question:",
            "What shape is shown?",
            p,
            "",
            shapes,
            [""] * len(shapes),
        )
        # retrieval: the scene and three others differing in colour or shape
        scenes = [(colour, shape)] + [
            (names[(i + j) % len(names)], SHAPES[(i + 2 * j) % len(SHAPES)]) for j in (1, 2, 3)
        ]
        paths, caps = [], []
        for j, (c, s) in enumerate(scenes):
            pj = f"bundled/ret/{i}_{j}.png"
            _save(_one(rng, c, s), img_root / pj)
            paths.append(pj)
            caps.append(f"a {c} {s}")
        add(
            t2i,
            "Find me an everyday image that matches the given caption:",
            caps[0],
            "",
            "<|image_1|> Represent the given image.",
            [""] * 4,
            paths,
        )
        add(
            i2t,
            "<|image_1|> Find an image caption describing the given everyday image.",
            "",
            paths[0],
            "",
            caps,
            [""] * 4,
        )
        # grounding: two objects; candidates are crops of each object and of the empty corner
        c2 = names[(i + 3) % len(names)]
        boxes = [(4, 4, 38, 38), (46, 46, 80, 80)]
        full = _image([(colour, shape, boxes[0]), (c2, SHAPES[(i + 1) % 3], boxes[1])], rng)
        fp = f"bundled/vg/{i}.png"
        _save(full, img_root / fp)
        crops = []
        for j, box in enumerate([boxes[0], boxes[1], (46, 4, 80, 38)]):
            cp = f"bundled/vg/{i}_crop{j}.png"
            _save(full.crop(box).resize((SIDE, SIDE)), img_root / cp)
            crops.append(cp)
        add(
            vg,
            "<|image_1|> Select the portion of the image that isolates the object of the given label:",
            f"the {colour} {shape}",
            fp,
            "<|image_1|> Represent the given cropped image of the object.",
            [""] * 3,
            crops,
        )
    for name, rows, parquet in (
        ("Bundled-ColourCLS", cls, False),
        ("Bundled-ShapeQA", qa, True),
        ("Bundled-T2I", t2i, False),
        ("Bundled-I2T", i2t, False),
        ("Bundled-Grounding", vg, False),
    ):
        _dataset(rows, root / "image" / name, parquet=parquet)


def _doc_tasks(root: Path, rng: random.Random) -> None:
    import datasets

    topics = ["rainfall", "harvest", "bridges", "rivers", "engines", "glaciers", "markets", "forests"]
    corpus = {"corpus-id": [], "image": []}
    for j, t in enumerate(topics):
        im = Image.new("RGB", (SIDE, SIDE * 4 // 3), (250, 250, 245))
        d = ImageDraw.Draw(im)
        d.text((4, 4), t, fill=(0, 0, 0))
        for line in range(1, 6):
            d.line([(4, 6 + 16 * line), (SIDE - 4 - rng.randint(0, 30), 6 + 16 * line)], fill=(90, 90, 90))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        corpus["corpus-id"].append(f"page{j}")
        corpus["image"].append({"bytes": buf.getvalue(), "path": None})
    queries = {"query-id": [], "query": []}
    qrels = {"query-id": [], "corpus-id": [], "score": []}
    for j, t in enumerate(topics[:6]):
        queries["query-id"].append(f"q{j}")
        queries["query"].append(f"What does the report say about {t}?")
        qrels["query-id"].append(f"q{j}")
        qrels["corpus-id"].append(f"page{j}")
        qrels["score"].append(2 if j % 2 == 0 else 1)
        if j < 3:  # a second, less relevant page
            qrels["query-id"].append(f"q{j}")
            qrels["corpus-id"].append(f"page{j + 5}")
            qrels["score"].append(1)
    qrels["query-id"].append("q5")  # a score-0 judgement: dropped, as in VLM2Vec
    qrels["corpus-id"].append("page7")
    qrels["score"].append(0)
    base = root / "visdoc" / "Bundled-DocRetrieval"
    feats = datasets.Features({"corpus-id": datasets.Value("string"), "image": datasets.Image()})
    _dataset(corpus, base / "corpus", features=feats)
    _dataset(queries, base / "queries")
    _dataset(qrels, base / "qrels")


def _motion_frames(direction: str, colour: str, rng: random.Random, n_frames: int = 8, side: int = 64) -> list:
    """uint8 [side, side, 3] frames of a 16-px square of ``colour`` moving ``direction`` on light grey."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    x, y = side // 2 - 8 - 12 * dx, side // 2 - 8 - 12 * dy
    step = rng.randint(3, 4)
    frames = []
    for f in range(n_frames):
        a = np.full((side, side, 3), 235, dtype=np.uint8)
        px, py = x + dx * step * f, y + dy * step * f
        a[max(py, 0) : py + 16, max(px, 0) : px + 16] = COLOURS[colour]
        frames.append(a)
    return frames


def _clip(path: Path, direction: str, colour: str, rng: random.Random, n_frames: int = 8, side: int = 64) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        st = out.add_stream("libx264", rate=4)
        st.width = st.height = side
        st.pix_fmt = "yuv420p"
        st.options = {"crf": "18"}
        for a in _motion_frames(direction, colour, rng, n_frames, side):
            for pkt in st.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def _frame_folder(d: Path, frames: list) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(frames):
        Image.fromarray(a).save(d / f"{i:04d}.png")


def _moment_task(root: Path, rng: random.Random) -> None:
    rows = {"query": [], "video_path": []}
    colours = list(COLOURS)
    for i in range(2):
        vid = f"movie{i}"
        d = root / "video-tasks" / "Bundled-MomentRET" / vid
        segs = [(DIRECTIONS[(i + k) % 4], colours[(2 * i + k) % len(colours)]) for k in range(3)]
        frames = [_motion_frames(direction, colour, rng, n_frames=4) for direction, colour in segs]
        _frame_folder(d / "query", [f for seg in frames for f in seg])
        pos = (i + 1) % 3
        for k, seg in enumerate(frames):
            _frame_folder(d / ("positive" if k == pos else f"negative_{k}"), seg)
        rows["query"].append(f"the {segs[pos][1]} square moves {segs[pos][0]}")
        rows["video_path"].append(f"{vid}.mp4")
    _dataset(rows, root / "video" / "Bundled-MomentRET")


def _video_tasks(root: Path, rng: random.Random) -> None:
    motion = {"video_id": [], "pos_text": []}
    ret = {"video_id": [], "video": [], "caption": []}
    colours = list(COLOURS)
    for i, direction in enumerate(DIRECTIONS):
        vid = f"clip{i}"
        _clip(root / "video-tasks" / "Bundled-VideoMotion" / f"{vid}.mp4", direction, colours[i], rng)
        motion["video_id"].append(vid)
        motion["pos_text"].append(f"moving {direction}")
    for i, direction in enumerate(DIRECTIONS[:3]):
        vid = f"video{i}"
        c = colours[(i + 2) % len(colours)]
        _clip(root / "video-tasks" / "Bundled-VideoRET" / f"{vid}.mp4", direction, c, rng)
        ret["video_id"].append(vid)
        ret["video"].append(f"{vid}.mp4")
        ret["caption"].append(f"a {c} square moves {direction}")
    _dataset(motion, root / "video" / "Bundled-VideoMotion")
    _dataset(ret, root / "video" / "Bundled-VideoRET")


def generate(root: str | Path, *, seed: int = 0, n_image: int = 6, overwrite: bool = False) -> dict:
    """Write the set under ``root`` (empty or absent; with ``overwrite``, an earlier output of this
    generator, identified by its marker, is replaced). Returns {"root", "tasks", "seed"}."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not (overwrite and (root / MARKER).is_file()):
            raise GeneratorTargetError(
                f"{root} is not empty"
                + ("" if overwrite else " (pass overwrite=True / --overwrite)")
                + ("" if (root / MARKER).is_file() else f" and holds no {MARKER} marker: choose an empty directory")
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    _image_tasks(root, rng, n_image)
    _doc_tasks(root, rng)
    _video_tasks(root, rng)
    _moment_task(root, rng)
    (root / "mmeb_tasks.json").write_text(json.dumps({"tasks": TASKS}, indent=1) + "\n", encoding="utf-8")
    (root / MARKER).write_text(f"seed {seed}\n", encoding="utf-8")
    return {"root": str(root), "tasks": [t["name"] for t in TASKS], "seed": seed}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    s = generate(a.out, seed=a.seed, overwrite=a.overwrite)
    print(json.dumps(s, indent=1))
    return s


if __name__ == "__main__":
    cli(main, prog="python -m elva_jax.data.benchmarks.mmeb.bundled")
