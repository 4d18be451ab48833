"""Embed-RL evidence grounding at evaluation: a reasoner writes a T-CoT for every query and candidate side.

``python -m elva_jax.eval --cot reasoner=DIR [--cot-crops] ...`` (``eval.cot_*``): the reasoner (an
Embed-RL run's export, or any transformers checkpoint of a supported family) writes one T-CoT per
distinct side with the reasoner prompt of training (`elva_jax.data.tcot.encoders.reasoner_prompt`,
``embed_rl.reasoner_instruction``), through the shared sampler (`elva_jax.model.sampler.generate`,
stop = ``<|im_end|>``, which also ends a CoT that ran out of ``cot_max_tokens``; greedy = top_k 1, or
sampled at ``cot_temperature`` / ``cot_top_p`` with a key per batch from ``cot_seed``). Prompts go
through the corpus pipeline: batches of ``cot_batch_size`` padded to a length bucket
(``rl.prompt_buckets``, the reasoner's prompt buckets in training) and a fixed patch budget, so one
program is compiled per bucket. The --checkpoint model then embeds each side with its CoT in the frozen
embedder's layout (`elva_jax.eval.embed.Embedder` with a ``cot``).

Evidence (``cot_crops``): each CoT is parsed strictly (`elva_jax.data.tcot.parser.parse_tcot`, the kind the side
asks for: ``bbox_2d`` for an image side, ``key_frames`` for a video side). Each box [x1, y1, x2, y2] in
0-1000 coordinates of the image becomes a crop (:func:`box_pixels`) and each key frame the frame the
reasoner saw (the pipeline's frame sampling of the video at the reasoner's geometry); at most
``cot_max_crops`` per side, appended to the side as ``extra_images``. A CoT whose evidence does not parse
adds nothing and is counted (``stats["unparsable"]``, reasons in ``stats["reasons"]``).

Cache (one directory per fingerprint = reasoner weights + prompt + decoding + shapes)::

    {dir}/fingerprint.json     what the CoTs depend on
    {dir}/cots.jsonl           one line per side: {"key": sha256(side content), "cot", "truncated"}
    {dir}/crops/*.png          evidence images (content-addressed: image path + box, video path + frame)

Lines are appended (and fsynced) after each batch, so an interrupted run resumes; a rerun generates
nothing (``generate_calls`` stays 0). Side content = text, image path, instruction, video path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from elva_jax.data.media.image_processing import MAX_ASPECT_RATIO, load_image, to_rgb_array
from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.media.video import decode_video, load_video
from elva_jax.data.pipeline.config import PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline
from elva_jax.data.progress import Progress
from elva_jax.data.prompts import TCOT_REASONER_INSTRUCTION
from elva_jax.data.tcot.encoders import reasoner_encoder
from elva_jax.data.tcot.parser import COORD_MAX, parse_tcot
from elva_jax.eval.corpus import batch_devices, corpus_pipeline_config, left_align, place_params, put_batch
from elva_jax.eval.embed_cache import CacheError
from elva_jax.model.config import ModelOptions
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.schema import project

__all__ = ["CoTConfig", "CoTGenerator", "box_pixels", "crop_box", "cot_config", "side_key"]

_FORMAT = "elva_jax.eval.cot/1"


@dataclasses.dataclass(frozen=True)
class CoTConfig:
    """How sides become T-CoTs (and evidence images); all of it enters the CoT cache fingerprint.

    request: the reasoner's instruction. max_tokens: new tokens before a forced ``<|im_end|>``.
    sampling "greedy" (top_k 1) or "sample" (temperature, top_p; key per batch from seed).
    batch_size / seq_buckets / patch_rows / media (pixel limits, patch row, video sampling): the prompt batches.
    crops / max_crops / key_frame_base: evidence images (module docstring).
    """

    request: str = TCOT_REASONER_INSTRUCTION
    max_tokens: int = 256
    sampling: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (256, 512, 1024)
    patch_rows: int = 0
    media: MediaSettings = MediaSettings()
    crops: bool = False
    max_crops: int = 4
    key_frame_base: int = 1

    def __post_init__(self):
        if self.sampling not in ("greedy", "sample"):
            raise ValueError(f"cot sampling must be 'greedy' or 'sample', got {self.sampling!r}")
        if self.batch_size < 1 or self.max_tokens < 1 or self.max_crops < 0:
            raise ValueError("cot batch_size and max_tokens must be >= 1, max_crops >= 0")

    def sampler_config(self, cache_dtype: str) -> SamplerConfig:
        if self.sampling == "greedy":
            return SamplerConfig(max_new_tokens=self.max_tokens, top_k=1, cache_dtype=cache_dtype)
        return SamplerConfig(
            max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, cache_dtype=cache_dtype
        )

    def describe(self) -> dict:
        """What the CoTs depend on (results.json and the fingerprint); crops only change the embeddings."""
        d: dict[str, Any] = {
            "request": self.request,
            "max_new_tokens": self.max_tokens,
            "sampling": self.sampling,
            "max_length": max(self.seq_buckets),
            "pixels": [self.media.min_pixels, self.media.max_pixels],
            "video": self.media.video(),
        }
        if self.sampling == "greedy":
            d["rule"] = "greedy (top_k=1)"
        else:  # the key is per batch, so the grouping matters
            d.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed, batch_size=self.batch_size)
        return d

    def describe_crops(self) -> dict:
        return {"crops": self.crops, "max_crops": self.max_crops, "key_frame_base": self.key_frame_base}


def cot_config(cfg) -> CoTConfig:
    """The CoT settings of a run config: ``eval.cot_*`` (batch size 0 = ``eval.batch_size``), the reasoner's
    instruction and key-frame base from ``embed_rl``, its prompt buckets from ``rl.prompt_buckets``, the
    patch budget, pixel limits and video sampling from ``data``."""
    e, d = cfg.eval, cfg.data
    return CoTConfig(
        request=cfg.embed_rl.reasoner_instruction,
        max_tokens=e.cot_max_tokens,
        sampling=e.cot_sampling,
        temperature=e.cot_temperature,
        top_p=e.cot_top_p,
        seed=e.cot_seed,
        batch_size=e.cot_batch_size or e.batch_size,
        seq_buckets=tuple(cfg.rl.prompt_buckets),
        patch_rows=d.patch_rows,
        media=project(MediaSettings, d),
        crops=e.cot_crops,
        max_crops=e.cot_max_crops,
        key_frame_base=cfg.embed_rl.key_frame_base,
    )


def side_key(side: dict) -> str:
    """sha256 of a side's content (text, image path, instruction, video path): the CoT cache key."""
    content = [side.get("text"), side.get("image"), side.get("instruction"), side.get("video")]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def expected_kind(side: dict) -> str:
    """The evidence a side asks for: key frames (video), boxes (image), keywords (text)."""
    if side.get("video") is not None:
        return "key_frames"
    return "bbox_2d" if side.get("image") is not None else "text_keywords"


# ----------------------------------------------------------------------------------------------------
# evidence geometry


def box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (left, top, right, bottom), right / bottom exclusive, of a box [x1, y1, x2, y2] in
    0-1000 coordinates of a ``width`` x ``height`` image: ``left = floor(x1 W / 1000)``, ``right =
    ceil(x2 W / 1000)`` (likewise top / bottom with H), clamped to the image and at least one pixel wide."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(math.floor(x1 * width / COORD_MAX), 0), width - 1)
    top = min(max(math.floor(y1 * height / COORD_MAX), 0), height - 1)
    right = max(min(math.ceil(x2 * width / COORD_MAX), width), left + 1)
    bottom = max(min(math.ceil(y2 * height / COORD_MAX), height), top + 1)
    return left, top, right, bottom


def crop_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The crop [b - t, r - l, C] of an image array [H, W, C] at a 0-1000 box (:func:`box_pixels`)."""
    H, W = image.shape[:2]
    left, top, right, bottom = box_pixels(box, W, H)
    return image[top:bottom, left:right]


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# generation


@functools.lru_cache(maxsize=8)
def _generate_fn(model_cfg, opts, scfg: SamplerConfig, eos: int, pad: int):
    """The jitted sampler call (prompts [B, P] left-padded -> tokens [B, T], lengths [B], forced [B]);
    one per settings, shared by generators (a rerun in the same process compiles nothing)."""

    def gen(p, x, k):
        s = generate(p, x, k, model_cfg, opts, scfg, num_samples=1, stop_ids=(eos,), ret_id=eos, pad_id=pad)
        return s.tokens, s.lengths, s.forced_ret

    return jax.jit(gen)


class CoTGenerator:
    """T-CoTs of sides with one reasoner model, cached under ``cache_root/{fingerprint_sha[:12]}`` (None: a
    temporary directory, nothing kept).

    identity: what names the reasoner's weights (enters the fingerprint). ``generate_calls`` counts the
    sampler calls (batches) of this object; ``stats`` = {"generated", "cached", "truncated",
    "unparsable", "reasons", "crops", "sides_without_crop"} summed over ``attach`` calls.
    """

    def __init__(
        self,
        params: dict,
        model_cfg,
        tokenizer,
        ccfg: CoTConfig,
        *,
        opts=None,
        identity: dict | None = None,
        cache_root: str | Path | None = None,
        mesh=None,
        log: Callable[[str], None] | None = None,
    ):
        self.opts = opts or ModelOptions()
        self.cfg, self.tok, self.ccfg, self.mesh = model_cfg, tokenizer, ccfg, mesh
        self.identity = dict(identity or {})
        self.log = log or (lambda s: print(s, flush=True))
        self.generate_calls = 0
        self.stats: dict[str, Any] = {
            "generated": 0,
            "cached": 0,
            "truncated": 0,
            "unparsable": 0,
            "reasons": Counter(),
            "crops": 0,
            "sides_without_crop": 0,
        }
        n_batch = batch_devices(mesh)
        if ccfg.batch_size % n_batch:
            raise ValueError(f"cot batch size {ccfg.batch_size} is not divisible by the {n_batch} batch devices")
        self.params = place_params(params, model_cfg, mesh)
        self.encoder = reasoner_encoder(tokenizer, ccfg.request, videos=True)
        eos = tokenizer.im_end_token_id
        scfg = dataclasses.replace(ccfg.sampler_config(self.opts.dtype), mesh=mesh)  # vocab gathered on a mesh
        self._gen = _generate_fn(model_cfg, self.opts, scfg, eos, tokenizer.pad_token_id)
        self._tmp = None
        if cache_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="elva_jax_cot_")
            cache_root = self._tmp.name
        self.dir = Path(cache_root) / self.fingerprint_sha[:12]
        self._memo: dict[str, dict] = {}
        self._frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._open_cache()

    @property
    def fingerprint(self) -> dict:
        return {
            "format": _FORMAT,
            "identity": self.identity,
            "cot": self.ccfg.describe(),
            "model": {
                "dtype": self.opts.dtype,
                "position_mode": self.opts.position_mode,
                "hidden_size": self.cfg.text.hidden_size,
                "vocab_size": self.cfg.text.vocab_size,
            },
            "tokenizer": {"vocab_size": self.tok.vocab_size},
        }

    @property
    def fingerprint_sha(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """CoT settings and the crop settings (what an embedding with these CoTs depends on)."""
        return {**self.fingerprint, "fingerprint_sha": self.fingerprint_sha, "evidence": self.ccfg.describe_crops()}

    # ------------------------------------------------------------------------------------------------
    def _open_cache(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fp_path = self.dir / "fingerprint.json"
        if fp_path.exists():
            try:
                old = json.loads(fp_path.read_text())
            except (OSError, ValueError) as e:
                raise CacheError(f"{fp_path}: unreadable CoT cache fingerprint ({e}); delete {self.dir}") from None
            if old.get("fingerprint_sha") != self.fingerprint_sha:
                raise CacheError(f"{fp_path}: CoT cache written for another reasoner or settings; delete {self.dir}")
        else:
            fp_path.write_text(
                json.dumps({"fingerprint": self.fingerprint, "fingerprint_sha": self.fingerprint_sha}, indent=1)
            )
        self._cots_path = self.dir / "cots.jsonl"
        if self._cots_path.exists():
            lines = self._cots_path.read_text().splitlines()
            for i, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                    self._memo[rec["key"]] = {"cot": rec["cot"], "truncated": bool(rec["truncated"])}
                except (ValueError, KeyError, TypeError):
                    if i == len(lines) - 1:  # a line cut by an interrupted write: regenerated
                        continue
                    raise CacheError(f"{self._cots_path}:{i + 1}: corrupt CoT cache line; delete {self.dir}") from None

    def _pipeline_config(self, records) -> PipelineConfig:
        return corpus_pipeline_config(self.ccfg, records, self.tok, self.opts, self.cfg)

    def _generate(self, todo: list[tuple[str, dict]]) -> None:
        """Generate the CoTs of ``todo`` [(key, side)] (distinct keys) and append them to the cache."""
        b = self.ccfg.batch_size
        recs = [{"id": k, "item": {f: s.get(f) for f in ("text", "image", "instruction", "video")}} for k, s in todo]
        recs = [{**r, "item": {k: v for k, v in r["item"].items() if v is not None or k != "video"}} for r in recs]
        padded = recs + [recs[-1]] * ((-len(recs)) % b)
        it = make_pipeline(padded, self.encoder, self.cfg, self._pipeline_config(padded), kind="corpus")
        base = jax.random.key(self.ccfg.seed)
        progress = Progress("cot", total=len(padded), unit="sides", every_s=30.0, log=self.log)
        done = 0
        with open(self._cots_path, "a") as f:
            for batch in it:
                keys = [str(k) for k in it.last_ids]
                progress.update(len(keys))
                key = jax.random.fold_in(base, zlib.crc32(keys[0].encode()) & 0x7FFFFFFF)
                self.generate_calls += 1
                toks, lens, forced = self._gen(self.params, put_batch(left_align(batch), self.mesh), key)
                toks, lens, forced = np.asarray(toks), np.asarray(lens), np.asarray(forced)
                for k, t, n, fr in zip(keys, toks, lens, forced):
                    if k in self._memo or done >= len(recs):
                        continue  # a padding copy
                    cot = self.tok.decode(t[:n].tolist(), skip_special_tokens=True)
                    self._memo[k] = {"cot": cot, "truncated": bool(fr)}
                    f.write(json.dumps({"key": k, "cot": cot, "truncated": bool(fr)}) + "\n")
                    done += 1
                    self.stats["generated"] += 1
                    self.stats["truncated"] += int(fr)
                f.flush()
                os.fsync(f.fileno())
        missing = [k for k, _ in todo if k not in self._memo]
        if missing:
            raise RuntimeError(f"the prompt pipeline dropped {len(missing)} sides (first {missing[0]})")

    def cots(self, sides: Sequence[dict]) -> list[str]:
        """The T-CoT of each side (generated once per distinct side content, then read from the cache)."""
        keys = [side_key(s) for s in sides]
        todo, seen = [], set()
        for k, s in zip(keys, sides):
            if k not in self._memo and k not in seen:
                seen.add(k)
                todo.append((k, s))
        self.stats["cached"] += len(keys) - len(todo)
        if todo:
            self._generate(todo)
        return [self._memo[k]["cot"] for k in keys]

    # ------------------------------------------------------------------------------------------------
    def _video_frames(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(the frame indices the reasoner saw, every decoded frame [N, H, W, 3]) of a video."""
        if path not in self._frames:
            m = self.ccfg.media
            v = load_video(path, self.cfg.vision.geometry, **m.video_sampling(), max_patches=m.patch_row_len)
            self._frames = {path: (np.asarray(v.frame_indices), decode_video(path)[0])}  # keep one video
        return self._frames[path]

    def _evidence(self, side: dict, cot: str) -> list[str]:
        """Parse ``cot`` for the side's kind; with crops, the paths of its evidence images."""
        c, kind = self.ccfg, expected_kind(side)
        idx = frames = None
        if kind == "key_frames" and c.crops:
            idx, frames = self._video_frames(side["video"])
        p = parse_tcot(
            cot,
            check="strict",
            expected=kind,
            num_frames=None if idx is None else len(idx),
            frame_base=c.key_frame_base,
        )
        ok = p.ok or (p.reason == "key_frames_without_video" and kind == "key_frames")  # range unchecked (no crops)
        if not ok:
            self.stats["unparsable"] += 1
            self.stats["reasons"][p.reason] += 1
        if not c.crops or kind == "text_keywords":
            return []
        out: list[str] = []
        if ok and kind == "bbox_2d":
            arr = to_rgb_array(load_image(side["image"]))
            for box in p.boxes[: c.max_crops]:
                crop = crop_box(arr, box)
                h, w = crop.shape[:2]
                if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:  # the image processor refuses it
                    self.stats["reasons"]["crop_aspect_ratio"] += 1
                    continue
                name = hashlib.sha256(json.dumps([side["image"], list(box)]).encode()).hexdigest()[:24]
                path = self.dir / "crops" / f"{name}.png"
                if not path.exists():
                    _save_png(path, crop)
                out.append(str(path))
        elif ok and kind == "key_frames":
            for k in p.frames[: c.max_crops]:
                i = int(idx[k - c.key_frame_base])
                name = hashlib.sha256(json.dumps([side["video"], i]).encode()).hexdigest()[:24]
                path = self.dir / "crops" / f"{name}.png"
                if not path.exists():
                    _save_png(path, frames[i])
                out.append(str(path))
        self.stats["crops"] += len(out)
        self.stats["sides_without_crop"] += int(not out)
        return out

    def attach(self, records: Sequence[dict]) -> list[dict]:
        """Records ``{"id", "item"}`` -> the same with ``item["cot"]`` (and ``item["extra_images"]`` with
        crops on)."""
        cots = self.cots([r["item"] for r in records])
        out = []
        for r, cot in zip(records, cots):
            item = {**r["item"], "cot": cot}
            extra = self._evidence(item, cot)
            if extra:
                item["extra_images"] = extra
            out.append({**r, "item": item})
        return out

    def summary(self) -> dict:
        """The counts for results.json."""
        return {
            **self.stats,
            "reasons": dict(sorted(self.stats["reasons"].items())),
            "generate_calls": self.generate_calls,
        }
