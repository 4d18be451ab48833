"""The bundled multi-grain set in memory: per split, base scenes with their one-grain variants, rendered
candidates and one query per task (:func:`build_split` into a :class:`Builder`)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from elva_jax.data.benchmarks.multigrain.scenes import Obj, Scene, fresh_variants, random_scene, render, sorted_scene
from elva_jax.data.benchmarks.multigrain.texts import (
    caption,
    caption_segments,
    edit_segments,
    paraphrase_segments,
    render_segments,
    summary_variants,
)
from elva_jax.data.progress import Progress

__all__ = ["DATASET_ID", "DATASET_NAME", "N_EDIT_NEGATIVES", "N_HARD_NEGATIVES", "TASKS", "Builder", "build_split"]

DATASET_ID = 10
DATASET_NAME = "multigrain"
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


class Builder:
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
            "paraphrase": render_segments(paraphrase_segments(scene, self.rng))[0],
        }
        return sid

    def image(self, sid: str, split: str, k: int) -> str:
        """Render scene ``sid`` (rendering k) to PNG; return its path relative to the root."""
        rel = f"images/{DATASET_NAME}/{split}/{sid}_r{k}.png"
        scene = sorted_scene(Obj(**o) for o in self.scenes[sid]["objects"])
        buf = io.BytesIO()
        render(scene, self.rng).save(buf, format="PNG")
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(buf.getvalue())
        self.n_images += 1
        if self.progress is not None:
            self.progress.update()
        return rel

    def summaries(self, sid: str) -> list[str]:
        """Target summaries of scene ``sid`` (the same list wherever the scene appears)."""
        scene = sorted_scene(Obj(**o) for o in self.scenes[sid]["objects"])
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


def build_split(b: Builder, split: str, n: int) -> None:
    rng = b.rng
    per_scene: list[dict] = []
    for _ in range(n):
        scene = random_scene(rng)
        while scene in b.seen:
            scene = random_scene(rng)
        sid = b.add_scene(scene, split, "base", None, None)
        variants = [
            b.add_scene(v, split, "variant", sid, e) for v, e in fresh_variants(scene, N_HARD_NEGATIVES, rng, b.seen)
        ]
        target_sid = variants[0]
        target = sorted_scene(Obj(**o) for o in b.scenes[target_sid]["objects"])
        edit_negs = [
            b.add_scene(v, split, "edit_variant", target_sid, e)
            for v, e in fresh_variants(target, N_EDIT_NEGATIVES, rng, b.seen)
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
                paraphrase = render_segments(paraphrase_segments(scene, rng))[0]
                b.nli_rows.append((b.scenes[sid]["caption"], paraphrase, b.scenes[v]["caption"]))

    for task in TASKS:
        for s in per_scene:
            sid = s["sid"]
            cap_text, cap_grains = render_segments(caption_segments(s["scene"]))
            txt, img, target, grain_field = None, s["query_img"], sid, "caption"
            text, grains = cap_text, cap_grains
            if task == 0:  # caption -> image
                txt, img, grain_field = cap_text, None, "query_txt"
                pos, negs = s["pos_img"], s["var_imgs"]
            elif task == 1:  # paraphrase -> caption
                text, grains = render_segments(paraphrase_segments(s["scene"], rng))
                txt, img, grain_field = text, None, "query_txt"
                pos, negs = s["pos_txt"], s["var_txts"]
            elif task == 3:  # image -> caption
                pos, negs = s["pos_txt"], s["var_txts"]
            elif task == 4:  # image -> other rendering
                pos, negs = s["pos_img"], s["var_imgs"]
            else:  # image + edit text -> edited scene; the unedited scene is a negative
                tgt = b.scenes[s["target"]]
                tgt_scene = sorted_scene(Obj(**o) for o in tgt["objects"])
                text, grains = render_segments(edit_segments(s["scene"], tgt_scene, tgt["edit"]))
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
