"""Grain input pipelines with static shapes, image-failure policies and checkpointable iterators.

Training flow (``kind="contrastive"``, also NLI and RL records), elastic over the host count:
records (plain dicts) -> ``MapDataset.source`` -> seeded ``shuffle`` -> ``repeat`` -> encode (load
images and videos, tokenize; random access, so a record dropped by the skip policy is replaced by a substitute,
below) -> per-host slice ``[start + process_index :: process_count]`` -> ``to_iter_dataset`` ->
``batch`` (pad to a sequence bucket, pack images and videos into a fixed patch budget) -> optional
``mp_prefetch``.

A side is ``{"text", "image", "instruction"}`` plus optionally ``"video"`` (a video file or a frame
folder, local or an epath URL such as ``gs://``; a folder's frame rate is the side's ``"video_fps"``,
when it has one; prepared sources add ``"video_data"``: the file's bytes or the folder's frames'
bytes), decoded with :func:`elva_jax.data.video.load_video` at the config's video settings and the
model's geometry; a video over a patch row is resampled with fewer frames. A missing or undecodable
video, or one whose tokens overflow the largest sequence bucket, follows the image policy like a bad
image. Optional ``"extra_images"`` (local paths) follow the side's image, in order, each its own image
(the encoder's prompt must count them: `elva_jax.data.tcot_prompts`).

Global batch g holds the records at global indices [g*G, (g+1)*G), G = records per host batch x
process count; host h takes indices h, h+H, ... of it. The iterator's state is the global index of
the next batch (``{"global_next_index": ...}``), identical on every host, so a run saved on H hosts
resumes on any H' that divides the same global batch, each step seeing the same records. Grain's own
``ElasticIterator`` follows the same scheme but batches with a plain stack and rejects ``filter``;
this pipeline needs its collation and its skip policy, so it implements the scheme itself.

Skip policy under this scheme: a record whose image is missing or unreadable is replaced by the
record at index i + G (the same slot of the next global batch; then i + 2G, ...), so batches keep
their size, the set of records of a step depends on neither the host nor the host count, and the
substitute is seen twice in the epoch (never twice in one batch). Skips are counted and capped.

Corpus flow (``kind="corpus"``, evaluation): one host, no resume; records dropped by the skip policy
are filtered out (reported through the iterator's stats) rather than substituted.

Batches are numpy dicts in the layout of :func:`elva_jax.model.inputs.build_inputs` with a leading
micro-batch axis A: contrastive / NLI batches are ``{"query": inputs, "cand": inputs}`` whose cand rows
per micro-batch are the b positives then the b*k hard negatives (query order); RL batches are
``{"query": ..., "cand": ...}`` with b*(1+N) candidate rows; corpus batches are one ``inputs`` dict
without the A axis. Record ids of each batch are in ``iterator.last_ids``. All micro-batches of a
group share the smallest bucket fitting their longest row, so a run compiles at most
``len(seq_buckets)`` programs per group.

Instructions are chosen deterministically: prompt ``crc32(qid) % len(prompts)`` of the instruction
table entry for (dataset, query modality, candidate modality).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from etils import epath

from elva_jax.data.errors import ImageError, RecordError
from elva_jax.data.image_processing import (
    LAMRA_MAX_PIXELS,
    LAMRA_MIN_PIXELS,
    load_image,
    load_image_bytes,
    preprocess_images,
)
from elva_jax.data.mbeir import Candidate, Query, dataset_id_of, instruction_key, resolve_image_path
from elva_jax.data.prompts import choose_instruction
from elva_jax.data.video import VideoError, VideoInput, load_video
from elva_jax.errors import UserError
from elva_jax.model.config import DEFAULT_GEOMETRY, ModelConfig, PatchGeometry
from elva_jax.model.inputs import pack_images, position_ids

__all__ = [
    "DataStateMismatch",
    "ImagePolicy",
    "PipelineConfig",
    "PipelineIterator",
    "PipelineStats",
    "SkippedFractionError",
    "VIDEO_FIELDS",
    "collate_group",
    "contrastive_records",
    "corpus_records",
    "make_pipeline",
    "nli_records",
    "restore_checkpoint",
    "rl_records",
    "save_checkpoint",
]


# ----------------------------------------------------------------------------------------------------
# configuration, policy, counters


class DataStateMismatch(UserError, ValueError):
    """A saved data position that does not belong to this run's records / shuffle seed."""


class SkippedFractionError(UserError, RuntimeError):
    """More records were dropped for bad images than the policy's ``max_skip_fraction`` allows."""


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """What a missing/unreadable image does: ``"fail"`` raises (message names the path); ``"skip"``
    drops the whole record, counts it, and raises SkippedFractionError once ``skipped > max_skip_fraction
    * seen`` with at least ``min_seen`` records seen."""

    mode: str = "fail"
    max_skip_fraction: float = 0.01
    min_seen: int = 100

    def __post_init__(self):
        if self.mode not in ("fail", "skip"):
            raise ValueError(f"image policy mode must be 'fail' or 'skip', got {self.mode!r}")


#: the video settings PipelineConfig and EmbedConfig take from the run's data section (same names)
VIDEO_FIELDS = ("video_fps", "video_min_frames", "video_max_frames", "video_min_pixels", "video_max_pixels")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static-shape and ordering knobs.

    batch_size: queries per micro-batch (b); micro_batches: A. seq_buckets: allowed padded lengths
    (longer rows are truncated by the encoder to the largest). patch_budget: (R, Lv) for every group
    (None: text-only data, no patch arrays); cand_patch_budget overrides it for candidates (None:
    same). num_negatives: k hard negatives per query (contrastive/NLI; 0 = none). num_epochs: None repeats forever.
    process_index/process_count: None -> jax.process_index()/process_count().
    mp_workers: > 0 enables grain ``mp_prefetch`` with that many worker processes.
    """

    batch_size: int = 4
    micro_batches: int = 1
    seq_buckets: tuple[int, ...] = (64, 128, 256)
    patch_budget: tuple[int, int] | None = (4, 256)
    cand_patch_budget: tuple[int, int] | None = None
    num_negatives: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    process_index: int | None = None
    process_count: int | None = None
    image_policy: ImagePolicy = ImagePolicy()
    mp_workers: int = 0
    drop_remainder: bool = True
    pad_token_id: int = 151643
    position_mode: str = "mrope"
    # image preprocessing: pixel limits (the run's data.min_pixels / max_pixels) and the model's patches
    min_pixels: int = LAMRA_MIN_PIXELS
    max_pixels: int = LAMRA_MAX_PIXELS
    geometry: PatchGeometry = DEFAULT_GEOMETRY
    # video sampling / sizing (the run's data.video_*, same defaults; `elva_jax.data.video.load_video`): fps 0 = every
    # frame; pixel limits 0 = the family's video-processor defaults (per frame for Qwen2-VL / Qwen2.5-VL,
    # over all frames for Qwen3-VL). A video over a patch row is resampled with fewer frames.
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_pixels: int = 4 * 28 * 28
    video_max_pixels: int = 64 * 28 * 28

    @property
    def records_per_batch(self) -> int:
        return self.batch_size * self.micro_batches


@dataclasses.dataclass
class PipelineStats:
    """Counters aggregated in the consuming process (also across mp_prefetch workers).

    seen: records read; skipped: records dropped for a bad image; truncated: texts cut to the largest
    bucket; batches / examples: emitted; images / videos: images / videos in emitted batches; skipped_paths:
    last few offending image or video paths."""

    seen: int = 0
    skipped: int = 0
    truncated: int = 0
    batches: int = 0
    examples: int = 0
    images: int = 0
    videos: int = 0
    skipped_paths: list[str] = dataclasses.field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0


# ----------------------------------------------------------------------------------------------------
# record builders (pure python, picklable dicts)


def _side(
    text: str | None,
    image: str | None,
    instruction: str | None = None,
    video: str | None = None,
    video_fps: float | None = None,
) -> dict:
    """A side dict; ``"video"`` only when there is one, ``"video_fps"`` (a frame folder's rate) only when
    given (records without video are unchanged)."""
    s = {"text": text, "image": image, "instruction": instruction}
    if video is not None:
        s["video"] = video
        if video_fps is not None:
            s["video_fps"] = video_fps
    return s


def _media(root, path: str | None) -> str | None:
    """An image or video path of a record resolved against the data root (None stays None)."""
    return str(resolve_image_path(root, path)) if path else None


def pick_instruction(instructions: dict[str, tuple[str, ...]] | None, qid: str, qmod: str, cmod: str) -> str | None:
    if not instructions:
        return None
    prompts = instructions.get(instruction_key(dataset_id_of(qid), qmod, cmod))
    if not prompts:
        return None
    return choose_instruction(prompts, qid)


def _cand_side(c: Candidate, root: str | Path) -> dict:
    return _side(c.txt, _media(root, c.img_path), None, _media(root, c.video_path), c.video_fps)


def take_negatives(negs: Sequence[str], k: int, qid: str) -> list[str]:
    """First k of neg_cand_list (list order); cycled when shorter. Raises when none exist and k > 0."""
    if k == 0:
        return []
    if not negs:
        raise RecordError(f"query {qid!r} has no neg_cand_list entries but {k} hard negatives were asked")
    return [negs[i % len(negs)] for i in range(k)]


def contrastive_records(
    queries: Sequence[Query],
    pool: dict[str, Candidate],
    root: str | Path,
    *,
    instructions: dict[str, tuple[str, ...]] | None = None,
    num_negatives: int = 0,
    dropped: list[str] | None = None,
) -> list[dict]:
    """M-BEIR queries + pool -> [{"id", "query", "cands": [positive, *negatives]}]; the positive is the
    first pos_cand, negatives the first k of neg_cand_list (deterministic).

    A query that cannot make a record (no positive, a candidate missing from the pool, no negatives to
    take) raises RecordError naming it; with ``dropped`` given (the skip policy) it is left out instead
    and its "qid: reason" appended there, so the caller counts and reports it."""
    out = []
    for q in queries:
        try:
            out.append(_contrastive_record(q, pool, root, instructions, num_negatives))
        except RecordError as e:
            if dropped is None:
                raise
            dropped.append(str(e))
    return out


def _contrastive_record(q: Query, pool: dict[str, Candidate], root, instructions, num_negatives: int) -> dict:
    if not q.pos_cand_list:
        raise RecordError(f"query {q.qid!r} has no positive candidate")
    dids = [q.pos_cand_list[0], *take_negatives(q.neg_cand_list, num_negatives, q.qid)]
    missing = [d for d in dids if d not in pool]
    if missing:
        raise RecordError(f"query {q.qid!r}: candidates {missing} are not in the pool")
    cmod = pool[dids[0]].modality
    instr = pick_instruction(instructions, q.qid, q.query_modality, cmod)
    query = _side(
        q.query_txt, _media(root, q.query_img_path), instr, _media(root, q.query_video_path), q.query_video_fps
    )
    return {"id": q.qid, "query": query, "cands": [_cand_side(pool[d], root) for d in dids]}


def nli_records(rows: Sequence[tuple[str, str, str | None]], *, num_negatives: int = 0) -> list[dict]:
    """NLI triples -> records (sent0 query, sent1 positive, hard_neg negative when num_negatives=1)."""
    if num_negatives not in (0, 1):
        raise ValueError("NLI rows carry at most one hard negative")
    return [nli_record(i, row, num_negatives) for i, row in enumerate(rows)]


def nli_record(i: int, row: tuple[str, str, str | None], num_negatives: int) -> dict:
    """Row i of an NLI table -> its record (id ``"nli:{i}"``)."""
    s0, s1, neg = row
    cands = [_side(s1, None)]
    if num_negatives:
        if neg is None:
            raise ValueError(f"NLI row {i} has no hard_neg")
        cands.append(_side(neg, None))
    return {"id": f"nli:{i}", "query": _side(s0, None), "cands": cands}


def rl_records(
    instances: Sequence[dict], pool: dict[str, Candidate], root: str | Path, *, num_negatives: int
) -> list[dict]:
    """RL instances ``{"query": Query, "positive": did, "negatives": [did, ...]}`` -> records with
    exactly 1 + num_negatives candidates (negatives cycled when short)."""
    out = []
    for inst in instances:
        q: Query = inst["query"]
        dids = [inst["positive"], *take_negatives(list(inst["negatives"]), num_negatives, q.qid)]
        img, vid = _media(root, q.query_img_path), _media(root, q.query_video_path)
        out.append(
            {
                "id": q.qid,
                "query": _side(q.query_txt, img, inst.get("instruction"), vid, q.query_video_fps),
                "cands": [_cand_side(pool[d], root) for d in dids],
            }
        )
    return out


def corpus_records(
    items: Sequence[Candidate] | Sequence[Query],
    root: str | Path,
    *,
    instructions: dict[str, tuple[str, ...]] | None = None,
    cand_modality: str | None = None,
) -> list[dict]:
    """Pool candidates or queries -> [{"id", "item"}] for embedding (queries get their instruction
    when ``instructions`` and ``cand_modality`` are given)."""
    out = []
    for it in items:
        if isinstance(it, Query):
            img, vid = _media(root, it.query_img_path), _media(root, it.query_video_path)
            instr = pick_instruction(instructions, it.qid, it.query_modality, cand_modality) if cand_modality else None
            out.append({"id": it.qid, "item": _side(it.query_txt, img, instr, vid, it.query_video_fps)})
        else:
            out.append({"id": it.did, "item": _cand_side(it, root)})
    return out


# ----------------------------------------------------------------------------------------------------
# encoding (per record, runs in grain workers)


class _EncodeRecord:
    """grain map: record -> encoded record (or a skip marker); keeps per-worker skip counters."""

    def __init__(self, encoder, cfg: PipelineConfig, group_keys: tuple[str, ...]):
        self.encoder, self.cfg, self.group_keys = encoder, cfg, group_keys
        self.seen = self.skipped = 0
        self.pending: list[str] = []  # skipped paths not yet reported downstream

    def _load(self, side: dict | str):
        """The side's image: from ``image_bytes`` when the side carries them (prepared sources; ``where``
        names the shard and record), else from the file ``image`` (local or an epath URL; a bare path
        string is such a file)."""
        side = {"image": side} if isinstance(side, str) else side
        path = side["image"]
        try:
            if "image_bytes" in side:
                if side["image_bytes"] is None:
                    raise ImageError(f"image {path} was missing when {side.get('where')} was prepared")
                image = load_image_bytes(side["image_bytes"], f"{path} (in {side.get('where')})")
            elif "://" in path:
                p = epath.Path(path)
                if not p.exists():
                    raise ImageError(f"image file not found: {path}")
                image = load_image_bytes(p.read_bytes(), path)
            else:
                if not Path(path).is_file():
                    raise ImageError(f"image file not found: {path}")
                image = load_image(path)
            c = self.cfg
            pv, grid = preprocess_images([image], min_pixels=c.min_pixels, max_pixels=c.max_pixels, geometry=c.geometry)
            rows = [b[1] for b in (c.patch_budget, c.cand_patch_budget) if b is not None]
            if rows and len(pv) > max(rows):
                raise ImageError(
                    f"image {path} needs {len(pv)} patches, more than a row of {max(rows)} "
                    "(lower data.max_pixels or raise data.patch_row_len)"
                )
            return pv, grid
        except ImageError as e:
            if self.cfg.image_policy.mode == "fail":
                raise ImageError(f"{e} (image policy 'fail'; path {path})") from e
            return None

    def _row_len(self, key: str) -> int | None:
        """Patch row length of the group that ``key``'s sides go to (None: text-only pipeline)."""
        c = self.cfg
        budget = c.cand_patch_budget or c.patch_budget if key == "cands" else c.patch_budget
        return None if budget is None else budget[1]

    def _load_video(self, side: dict, key: str, rid) -> VideoInput | None:
        """The side's ``video`` (file or frame folder; ``video_fps``: the folder's rate) decoded, sampled
        and patched (`elva_jax.data.video.load_video`, the model's geometry, the config's video settings, at
        most a patch row of patches: longer videos are resampled with fewer frames). None when the skip
        policy drops it; "fail" raises VideoError naming the file and the record."""
        c, path = self.cfg, side["video"]
        row_len = self._row_len(key)
        if row_len is None:
            raise ValueError(
                f"record {rid!r} has a video ({path}) but this pipeline has no patch budget (text-only data)"
            )
        data = side.get("video_data")  # prepared sources: the container's bytes or the frames' bytes
        try:
            if "video_data" in side:
                if data is None:
                    raise VideoError(f"video {path} was missing when {side.get('where')} was prepared")
            elif not (epath.Path(path).exists() if "://" in str(path) else Path(path).exists()):
                raise VideoError(f"video file not found: {path}")
            return load_video(
                path,
                c.geometry,
                fps=c.video_fps or None,
                min_frames=c.video_min_frames,
                max_frames=c.video_max_frames,
                min_pixels=c.video_min_pixels or None,
                max_pixels=c.video_max_pixels or None,
                max_patches=row_len,
                folder_fps=side.get("video_fps"),
                data=data,
            )
        except VideoError as e:
            if c.image_policy.mode == "fail":
                raise VideoError(f"{e} (record {rid!r}; image policy 'fail'; path {path})") from e
            return None

    def _encode_side(self, side: dict, key: str = "item", rid=None) -> tuple[dict | None, bool, str | None]:
        pv, grid = None, None
        if side["image"] is not None:
            loaded = self._load(side)
            if loaded is None:
                return None, False, side["image"]
            pv, grid = loaded
        for path in side.get("extra_images") or ():  # evidence crops / key frames (elva_jax.eval.cot), in order
            loaded = self._load(str(path))
            if loaded is None:
                return None, False, str(path)
            pv = loaded[0] if pv is None else np.concatenate([pv, loaded[0]])
            grid = loaded[1] if grid is None else np.concatenate([np.asarray(grid), np.asarray(loaded[1])])
        if side.get("video") is None:
            enc, trunc = self.encoder.encode(side, pv, grid, max(self.cfg.seq_buckets))
            return enc, trunc, None
        video = self._load_video(side, key, rid)
        if video is None:
            return None, False, side["video"]
        try:
            enc, trunc = self.encoder.encode(side, pv, grid, max(self.cfg.seq_buckets), videos=[video])
        except ValueError as e:  # the video's tokens alone overflow the largest sequence bucket
            err = VideoError(
                f"video {side['video']} of record {rid!r} ({tuple(video.grid_thw.tolist())} patches) does not fit "
                f"a row of {max(self.cfg.seq_buckets)} tokens: {e}; raise data.seq_buckets or lower "
                "data.video_max_pixels / data.video_max_frames"
            )
            if self.cfg.image_policy.mode == "fail":
                raise err from e
            return None, False, side["video"]
        return enc, trunc, None

    def encode_one(self, record: dict) -> tuple[dict | None, int, str | None]:
        """(encoded record or None, rows truncated, the bad image / video path when the skip policy drops it)."""
        out: dict[str, Any] = {"id": record["id"]}
        truncated = 0
        for key in self.group_keys:
            sides = record[key] if isinstance(record[key], list) else [record[key]]
            encs = []
            for side in sides:
                enc, trunc, bad = self._encode_side(side, key, record["id"])
                if enc is None:
                    return None, 0, bad
                truncated += trunc
                encs.append(enc)
            out[key] = encs
        return out, truncated, None

    def __call__(self, record: dict) -> dict:
        """Filter-path map: the record with ``_stats`` = (truncated, skipped paths not yet reported), or a
        ``{"_skip": path}`` marker that the filter drops."""
        self.seen += 1
        out, truncated, bad = self.encode_one(record)
        if out is None:
            self.skipped += 1
            pol = self.cfg.image_policy
            if self.seen >= pol.min_seen and self.skipped > pol.max_skip_fraction * self.seen:
                raise SkippedFractionError(
                    f"{self.skipped}/{self.seen} records skipped for bad images "
                    f"(> {pol.max_skip_fraction:.2%}); last: {bad}"
                )
            self.pending.append(bad)
            return {"_skip": bad}
        out["_stats"] = (truncated, self.pending)
        self.pending = []
        return out


class _EncodedWithSubstitutes(grain.MapDataset):
    """Random-access encoding for the elastic flow: index i -> record i encoded, with ``_stats`` =
    (truncated, skipped paths). When the skip policy drops record i, the record at i + stride (then
    i + 2*stride, ..., wrapping at the end) takes its place; stride is the global batch size, so the
    substitute comes from a later global batch. Gives up after ``max_tries`` unreadable records."""

    def __init__(self, parent: grain.MapDataset, encode: _EncodeRecord, stride: int, max_tries: int = 8):
        super().__init__(parent)
        self._encode, self._stride, self._max_tries = encode, stride, max_tries

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        bad_paths: list[str] = []
        for t in range(self._max_tries):
            out, truncated, bad = self._encode.encode_one(self._parent[(index + t * self._stride) % n])
            if out is not None:
                out["_stats"] = (truncated, bad_paths)
                return out
            bad_paths.append(bad)
        raise SkippedFractionError(
            f"record {index} and its {self._max_tries - 1} substitutes (every {self._stride}th record after "
            f"it) all have unreadable images: {bad_paths}"
        )

    def __str__(self) -> str:
        return f"EncodedWithSubstitutes(stride={self._stride})"


# ----------------------------------------------------------------------------------------------------
# collation (static shapes)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"row of {n} tokens exceeds the largest bucket {max(buckets)}")


def collate_group(
    micro: Sequence[Sequence[dict]],
    cfg: PipelineConfig,
    model_cfg: ModelConfig,
    budget: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """A micro-batches of encoded rows -> build_inputs-layout arrays with leading axis A, all padded to
    one sequence bucket; images, then videos (rows with ``pixel_values_videos`` / ``video_grid_thw`` /
    ``second_per_grid_ts``), packed into ``budget`` = (R, Lv) patch rows, each frame its own segment
    (arrays present even when the batch has no image, so shapes never change; ``budget=None`` omits them
    for text-only data). Equals ``build_inputs(**tokenize.collate(rows), rows=R, row_len=Lv)`` per micro-batch."""
    L = _bucket(max(len(r["input_ids"]) for rows in micro for r in rows), cfg.seq_buckets)
    outs = []
    for rows in micro:
        ids = np.full((len(rows), L), cfg.pad_token_id, np.int32)
        am = np.zeros((len(rows), L), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = r["input_ids"]
            am[i, : len(r["input_ids"])] = 1
        img_rows = [r for r in rows if r["pixel_values"] is not None]
        vid_rows = [r for r in rows if r.get("pixel_values_videos") is not None]
        grids = np.concatenate([r["image_grid_thw"] for r in img_rows]) if img_rows else np.zeros((0, 3), np.int64)
        vgrids = np.concatenate([r["video_grid_thw"] for r in vid_rows]) if vid_rows else None
        out = {"input_ids": ids, "attention_mask": am}
        if budget is not None:
            # images of all rows first, then videos (the order embed_inputs scatters features in)
            pv = [r["pixel_values"] for r in img_rows] + [r["pixel_values_videos"] for r in vid_rows]
            pv = np.concatenate(pv) if pv else np.zeros((0, model_cfg.vision.patch_dim), np.float32)
            g = grids if vgrids is None else np.concatenate([grids, vgrids])
            R, Lv = budget
            out.update(pack_images(pv, g, rows=R, row_len=Lv, cfg=model_cfg))
        elif vid_rows:
            raise ValueError("video rows need a patch budget (patch_budget is None: text-only data)")
        spg = np.concatenate([r["second_per_grid_ts"] for r in vid_rows]) if vid_rows else None
        out["positions"] = position_ids(ids, am, grids if img_rows else None, model_cfg, cfg.position_mode, vgrids, spg)
        outs.append(out)
    return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


class _Collate:
    """grain batch_fn: flat list of A*b encoded records -> the final batch (plus a ``_meta`` entry)."""

    def __init__(self, cfg: PipelineConfig, model_cfg: ModelConfig, kind: str):
        self.cfg, self.model_cfg, self.kind = cfg, model_cfg, kind

    def __call__(self, recs: Sequence[dict]) -> dict:
        cfg, b = self.cfg, self.cfg.batch_size
        truncated = sum(r["_stats"][0] for r in recs)
        skipped = [p for r in recs for p in r["_stats"][1]]
        if self.kind == "corpus":
            rows = [r["item"][0] for r in recs]
            batch = collate_group([rows], cfg, self.model_cfg, cfg.patch_budget)
            batch = {k: v[0] for k, v in batch.items()}
            n_img = sum(r["pixel_values"] is not None for r in rows)
            n_vid = sum(r.get("pixel_values_videos") is not None for r in rows)
        else:
            micro = [recs[a * b : (a + 1) * b] for a in range(cfg.micro_batches)]
            q = [[r["query"][0] for r in m] for m in micro]
            c = [[r["cands"][0] for r in m] + [x for r in m for x in r["cands"][1:]] for m in micro]
            batch = {
                "query": collate_group(q, cfg, self.model_cfg, cfg.patch_budget),
                "cand": collate_group(c, cfg, self.model_cfg, cfg.cand_patch_budget or cfg.patch_budget),
            }
            n_img = sum(x["pixel_values"] is not None for rows in q + c for x in rows)
            n_vid = sum(x.get("pixel_values_videos") is not None for rows in q + c for x in rows)
        batch["_meta"] = {
            "ids": [r["id"] for r in recs],
            "truncated": truncated,
            "images": n_img,
            "videos": n_vid,
            "skipped_paths": skipped,
        }
        return batch


def _not_skipped(rec: dict) -> bool:
    return "_skip" not in rec


# ----------------------------------------------------------------------------------------------------
# pipeline + iterator


class PipelineIterator:
    """Iterates batches (without ``_meta``), aggregates PipelineStats and keeps ``last_ids``.

    ``get_state()`` / ``set_state()`` give a JSON-able position. Elastic (training) iterators:
    ``{"global_next_index", "global_batch", "num_records", "seed"}``, the same on every host and valid
    for any host count (restoring checks that the records and seed are the ones it was saved with).
    Corpus iterators: Grain's own per-host state.
    """

    def __init__(self, cfg: PipelineConfig, *, make_iter, elastic: bool, global_batch: int, num_records: int):
        self.cfg = cfg
        self.stats = PipelineStats()
        self.last_ids: list[str] = []  # record ids of the last batch (row order, micro-batch major)
        self._make_iter, self._elastic = make_iter, elastic
        self._global_batch, self._num_records = global_batch, num_records
        self._position = 0  # elastic: global index of the next batch's first record
        self._iter = None

    @property
    def grain_iterator(self):
        if self._iter is None:
            self._iter = iter(self._make_iter(self._position))
        return self._iter

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self.grain_iterator)
        self._position += self._global_batch
        meta = batch.pop("_meta")
        s = self.stats
        s.batches += 1
        s.examples += len(meta["ids"])
        s.seen += len(meta["ids"]) + len(meta["skipped_paths"])
        s.skipped += len(meta["skipped_paths"])
        s.skipped_paths = (s.skipped_paths + meta["skipped_paths"])[-16:]
        if meta["skipped_paths"]:
            print(
                f"[elva_jax] data: skip policy replaced {len(meta['skipped_paths'])} record(s) with a bad image "
                f"({s.skipped} so far): {meta['skipped_paths'][0]}",
                flush=True,
            )
        s.images += meta["images"]
        s.videos += meta["videos"]
        s.truncated += meta["truncated"]
        self.last_ids = meta["ids"]
        pol = self.cfg.image_policy
        if s.seen >= pol.min_seen and s.skipped > pol.max_skip_fraction * s.seen:
            raise SkippedFractionError(
                f"{s.skipped}/{s.seen} records skipped for bad images (> {pol.max_skip_fraction:.2%}); "
                f"last: {s.skipped_paths[-1]}"
            )
        return batch

    def get_state(self) -> dict:
        if not self._elastic:
            return self.grain_iterator.get_state()
        return {
            "global_next_index": self._position,
            "global_batch": self._global_batch,
            "num_records": self._num_records,
            "seed": self.cfg.seed,
        }

    def set_state(self, state: dict) -> None:
        if not self._elastic:
            self.grain_iterator.set_state(state)
            return
        if "global_next_index" not in state:
            raise DataStateMismatch(f"data iterator state {state!r} is not an elastic pipeline state")
        saved = (state.get("num_records"), state.get("seed"))
        if saved != (self._num_records, self.cfg.seed):
            raise DataStateMismatch(
                f"the data iterator was saved over {saved[0]} records with shuffle seed {saved[1]}, but this "
                f"run has {self._num_records} records with seed {self.cfg.seed}: resuming would not continue "
                f"the same order (restore with the same data and data.shuffle_seed, or start a fresh run)"
            )
        if state["global_next_index"] % self._global_batch:
            print(
                f"[elva_jax] data: resuming at record {state['global_next_index']} with a global batch of "
                f"{self._global_batch} (saved with {state.get('global_batch')}): batches now start mid-way",
                flush=True,
            )
        self._position = int(state["global_next_index"])
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None


def make_pipeline(
    records: Sequence[dict],
    encoder,
    model_cfg: ModelConfig,
    cfg: PipelineConfig = PipelineConfig(),
    *,
    kind: str = "contrastive",
) -> PipelineIterator:
    """Build the pipeline over ``records`` and return a checkpointable iterator.

    kind: "contrastive" (also NLI and RL records: {"query", "cands"}; the elastic flow) or "corpus"
    ({"item"}). encoder: an object with ``encode(side, pixel_values, image_grid_thw, max_len) -> (row,
    truncated)`` (e.g. :class:`elva_jax.data.tokenize.PromptEncoder`). Each record must have exactly
    1 + cfg.num_negatives candidates.
    """
    if kind not in ("contrastive", "corpus"):
        raise ValueError(f"kind must be 'contrastive' or 'corpus', got {kind!r}")
    if kind == "contrastive" and isinstance(records, (list, tuple)):  # record views build 1 + k by construction
        for r in records:
            if len(r["cands"]) != 1 + cfg.num_negatives:
                raise ValueError(
                    f"record {r['id']!r} has {len(r['cands'])} candidates, expected {1 + cfg.num_negatives}"
                )
    pi, pc = cfg.process_index, cfg.process_count
    if pi is None or pc is None:
        import jax

        pi, pc = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(list(records) if not isinstance(records, Sequence) else records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    keys = ("query", "cands") if kind == "contrastive" else ("item",)
    encode = _EncodeRecord(encoder, cfg, keys)
    collate = _Collate(cfg, model_cfg, kind)
    G = cfg.records_per_batch * pc  # records per global batch

    def finish(it):
        it = it.batch(cfg.records_per_batch, drop_remainder=cfg.drop_remainder, batch_fn=collate)
        if cfg.mp_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.mp_workers))
        return it

    if kind == "corpus":

        def make_iter(_start):
            return finish(ds[pi::pc].to_iter_dataset().map(encode).filter(_not_skipped))

        return PipelineIterator(cfg, make_iter=make_iter, elastic=False, global_batch=G, num_records=len(records))

    encoded = _EncodedWithSubstitutes(ds, encode, stride=G)

    def make_iter(start: int):
        n = len(encoded)
        part = encoded[start:]
        if n < sys.maxsize and cfg.drop_remainder:  # every host gets the same number of full batches
            part = encoded[start : start + (n - start) // G * G]
        return finish(part[pi::pc].to_iter_dataset())

    return PipelineIterator(cfg, make_iter=make_iter, elastic=True, global_batch=G, num_records=len(records))


# ----------------------------------------------------------------------------------------------------
# checkpointing (Orbax + grain)


def save_checkpoint(directory: str | Path, step: int, iterator: PipelineIterator, **items) -> None:
    """Save the data iterator's position (a JSON item) with any other Orbax items (``items``: name ->
    ``ocp.args.*Save``, e.g. ``state=ocp.args.StandardSave(tree)``) at ``step``."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as mngr:
        args = ocp.args.Composite(data_iter=ocp.args.JsonSave(iterator.get_state()), **items)
        mngr.save(step, args=args)
        mngr.wait_until_finished()


def restore_checkpoint(directory: str | Path, iterator: PipelineIterator, step: int | None = None, **items):
    """Restore ``iterator``'s position in place and the other ``items`` (name -> ``ocp.args.*Restore``)
    from ``step`` (default: latest); returns the Orbax Composite result."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        out = mngr.restore(step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore(), **items))
        iterator.set_state(out["data_iter"])
        return out
