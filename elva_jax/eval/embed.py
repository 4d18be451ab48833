"""Embedding corpora (queries or pool candidates) for evaluation, with a resumable on-disk cache.

Three modes (:class:`EmbedConfig.mode`):

- ``"eol"`` (LamRA): the LamRA prompt with the assistant turn ``<emb>.``; one forward; the embedding is
  the L2-normalised final hidden state just before ``<emb>`` (:func:`elva_jax.model.embedding.eol_embedding`).
- ``"ret"`` (ELVA generative): the ELVA prompt with an open assistant turn; the model writes a summary
  (:func:`elva_jax.model.sampler.generate`: greedy = ``top_k=1``, or sampled with a seeded key) ending in
  ``[RET]`` (appended when ``summary_tokens`` runs out, substituted for EOS); then one teacher-forced
  forward over prompt + summary + ``[RET]`` gives the L2-normalised hidden state at ``[RET]`` (the same
  embedding as :func:`elva_jax.rl.rollout.teacher_forced`).
- ``"instruct_last"`` (Qwen3-VL-Embedding): the record's instruction (or ``default_instruction`` when it
  has none: candidates) as the system turn, the images then the text as the user turn, the generation
  prompt; one forward over the right-padded batch; the embedding is the L2-normalised final hidden state of
  the last real token (:func:`elva_jax.model.embedding.last_token_embedding`).

Records are ``{"id", "item": {"text", "image", "instruction"}}`` (:func:`elva_jax.data.pipeline.corpus_records`),
the item optionally with ``"video"`` (a local video file; prompt and patch budget as for an image).
They go through the corpus pipeline (``make_pipeline(kind="corpus")``, no shuffle, image policy
``fail``) in batches of ``batch_size`` padded to a sequence bucket and a fixed patch budget (the record
list is padded with copies of its last record, so every batch is full and a run compiles one program
per bucket). With a ``mesh`` the batch axis is split over ``("data", "fsdp")`` and the params follow
:mod:`elva_jax.parallel.sharding`.

Cache (``Embedder.embed(records, name=..., cache_dir=...)``)::

    {cache_dir}/{name}/index.json            fingerprint, ids, records hash, finished parts (+ sha256)
    {cache_dir}/{name}/part-00000.npy        float32 [<= part_size, D], records [0, part_size)
    {cache_dir}/{name}/part-00000.summaries.json   ("ret" mode) the generated summaries

The fingerprint holds the checkpoint identity (path, step, weight files), the mode and every prompt /
summary setting. A part is recorded in the index only after its file is written (atomically), so an
interrupted run resumes at the first unfinished part; finished parts are reused. A part the index
lists as finished whose file is missing or corrupt (size, header or sha256) raises :class:`CacheError`
naming the file (``cache="use"``, the default: a finished cache should never lose files silently), or is
reported and recomputed with ``cache="repair"``. An index written for another fingerprint or another
record list also raises :class:`CacheError`. ``cache="none"`` (or no ``cache_dir``) computes everything
and writes nothing. One writer per cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.data.image_processing import LAMRA_MAX_PIXELS, LAMRA_MIN_PIXELS
from elva_jax.data.pipeline import VIDEO_FIELDS, ImagePolicy, PipelineConfig, make_pipeline
from elva_jax.data.progress import Progress
from elva_jax.data.prompts import DEFAULT_EMBED_INSTRUCTION
from elva_jax.data.tcot_prompts import embedder_encoder
from elva_jax.data.tokenize import PromptEncoder, Tokenizer
from elva_jax.errors import UserError
from elva_jax.model import backbone
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.embedding import eol_embedding, l2_normalize, last_token_embedding, ret_embedding
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.schema import CACHE_POLICIES, EMBED_MODES

__all__ = ["CACHE_POLICIES", "CacheError", "EmbedConfig", "Embedder", "PartedArray", "records_digest"]

_FORMAT = "elva_jax.eval.embed/1"
_QWEN2_EOS = 151645  # <|im_end|>


class CacheError(UserError, RuntimeError):
    """An embedding cache that cannot be used as is (missing/corrupt part, foreign fingerprint)."""


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How records become embeddings (everything here enters the cache fingerprint).

    mode: "eol" | "ret" | "instruct_last". batch_size: records per batch (divisible by the mesh's batch
    devices).
    seq_buckets: padded lengths (longer rows are truncated to the largest by the prompt encoder).
    patch_rows / patch_row_len: image patch budget per batch (rows of patches; 0 rows = batch_size).
    part_size: records per cache part. "ret" only: summary_tokens (max new tokens before a forced
    [RET]), sampling "greedy" (top_k=1) or "sample" (temperature / top_k / top_p, key from ``seed``).
    "instruct_last" only: default_instruction, the system turn of records without an instruction.
    tcot_request: non-empty = Embed-RL's embedder layout (the Embedder then needs a ``cot`` generator,
    `elva_jax.eval.cot`): each side + its T-CoT + this summarise request, assistant ``<emb>``, the
    L2-normalised hidden state at ``<emb>`` (`elva_jax.data.tcot_prompts.embedder_prompt`, as the frozen
    embedder of `elva_jax.rl.embed_rl_trainer`); ``mode`` is then not used.
    """

    mode: str = "eol"
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (128, 256, 512)
    patch_rows: int = 0
    patch_row_len: int = 1200
    part_size: int = 1024
    summary_tokens: int = 32
    sampling: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION
    # image pixel limits (the run's data.min_pixels / max_pixels; LamRA's by default)
    min_pixels: int = LAMRA_MIN_PIXELS
    max_pixels: int = LAMRA_MAX_PIXELS
    # video sampling / sizing of video records (the run's data.video_*; see elva_jax.data.pipeline)
    video_fps: float = PipelineConfig.video_fps
    video_min_frames: int = PipelineConfig.video_min_frames
    video_max_frames: int = PipelineConfig.video_max_frames
    video_min_pixels: int = PipelineConfig.video_min_pixels
    video_max_pixels: int = PipelineConfig.video_max_pixels
    tcot_request: str = ""

    def __post_init__(self):
        if self.mode not in EMBED_MODES:
            raise ValueError(f"mode must be one of {EMBED_MODES}, got {self.mode!r}")
        if self.sampling not in ("greedy", "sample"):
            raise ValueError(f"sampling must be 'greedy' or 'sample', got {self.sampling!r}")
        if self.batch_size < 1 or self.part_size < 1 or self.summary_tokens < 1:
            raise ValueError("batch_size, part_size and summary_tokens must be >= 1")

    def sampler_config(self, cache_dtype: str = "float32") -> SamplerConfig:
        if self.sampling == "greedy":
            return SamplerConfig(max_new_tokens=self.summary_tokens, top_k=1, cache_dtype=cache_dtype)
        return SamplerConfig(
            max_new_tokens=self.summary_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            cache_dtype=cache_dtype,
        )

    def describe(self) -> dict:
        """The settings that define an embedding (results.json and the cache fingerprint)."""
        d: dict[str, Any] = {"mode": self.mode, "max_length": max(self.seq_buckets), "part_size": self.part_size}
        if (self.min_pixels, self.max_pixels) != (LAMRA_MIN_PIXELS, LAMRA_MAX_PIXELS):  # (keeps older fingerprints)
            d["pixels"] = [self.min_pixels, self.max_pixels]
        video = {k: getattr(self, k) for k in VIDEO_FIELDS}
        if video != {k: getattr(PipelineConfig, k) for k in VIDEO_FIELDS}:  # (keeps older fingerprints)
            d["video"] = video
        if self.tcot_request:
            d["mode"] = "tcot"
            d["embedding"] = "Embed-RL: side + its T-CoT + summarise request, hidden state at <emb>, L2-normalised"
            d["tcot_request"] = self.tcot_request
        elif self.mode == "eol":
            d["embedding"] = "LamRA EOL: hidden state before <emb>, L2-normalised"
        elif self.mode == "instruct_last":
            d["embedding"] = (
                "Qwen3-VL-Embedding: instruction as the system turn, generation prompt, "
                "hidden state of the last real token, L2-normalised"
            )
            d["default_instruction"] = self.default_instruction
        else:
            d["embedding"] = "ELVA generative: hidden state at [RET] after a generated summary, L2-normalised"
            d["summary"] = {"max_new_tokens": self.summary_tokens, "sampling": self.sampling}
            if self.sampling == "greedy":
                d["summary"]["rule"] = "greedy (top_k=1)"
            else:
                d["summary"].update(
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    seed=self.seed,
                    batch_size=self.batch_size,  # the key is per batch, so the grouping matters
                )
        return d


def records_digest(records: Sequence[dict]) -> str:
    """sha256 of the records' ids and sides (text, image path, instruction, and the video path of a record
    that has one: digests of records without video are unchanged), order-sensitive."""
    h = hashlib.sha256()
    for r in records:
        it = r["item"]
        side = [r["id"], it.get("text"), it.get("image"), it.get("instruction")]
        if it.get("video") is not None:
            side.append({"video": it["video"]})
        h.update(json.dumps(side).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class PartedArray:
    """Read-only [N, D] float32 view over the cache's part files (memory-mapped; slices concatenate).

    Works as ``candidates`` of :func:`elva_jax.retrieval.topk.streaming_topk`; ``np.asarray`` loads it whole.
    """

    def __init__(self, paths: Sequence[Path], dim: int):
        self._parts = [np.load(p, mmap_mode="r") for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.shape = (int(self._starts[-1]), dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            return np.asarray(self)[idx]
        start, stop, step = idx.indices(self.shape[0])
        if step != 1:
            return np.asarray(self)[idx]
        pieces = []
        for p, s0 in zip(self._parts, self._starts[:-1]):
            lo, hi = max(start, s0), min(stop, s0 + len(p))
            if lo < hi:
                pieces.append(p[lo - s0 : hi - s0])
        if not pieces:
            return np.zeros((0, self.shape[1]), np.float32)
        return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self._parts]) if self._parts else np.zeros(self.shape, np.float32)
        return out if dtype is None else out.astype(dtype)


def put_batch(batch: dict, mesh=None) -> dict:
    """Place a batch of model inputs on ``mesh`` (rows over the batch axes); as is without a mesh."""
    if mesh is None:
        return batch
    from jax.sharding import NamedSharding

    from elva_jax.model.inputs import input_axes
    from elva_jax.parallel.sharding import logical_spec

    sh = {k: NamedSharding(mesh, logical_spec(input_axes(k, np.ndim(v)))) for k, v in batch.items()}
    return jax.device_put(batch, sh)


def _left_align(batch: dict) -> dict:
    """Right-padded corpus batch -> left-padded (rows rolled; image order and positions unchanged)."""
    am = batch["attention_mask"]
    L = am.shape[1]
    shift = L - am.sum(axis=1)
    cols = (np.arange(L)[None, :] - shift[:, None]) % L  # out[:, j] = in[:, j - shift]
    out = dict(batch)
    out["input_ids"] = np.take_along_axis(batch["input_ids"], cols, axis=1)
    out["attention_mask"] = np.take_along_axis(am, cols, axis=1)
    out["positions"] = np.take_along_axis(batch["positions"], np.broadcast_to(cols, batch["positions"].shape), axis=2)
    return out


def ret_embed(params, prompts: dict, key, cfg: ModelConfig, opts: ModelOptions, scfg: SamplerConfig, ids: dict):
    """Generate a summary + [RET] per left-padded prompt row, then teacher-force prompt + summary + [RET].

    Returns (embeddings [B, D] fp32 L2-normalised at [RET], tokens [B, T], lengths [B] incl. [RET]).
    Generated tokens continue at 1 + the row's largest prompt position on all three axes (as decode does).
    """
    s = generate(
        params,
        prompts,
        key,
        cfg,
        opts,
        scfg,
        num_samples=1,
        stop_ids=(ids["ret"], ids["eos"]),
        ret_id=ids["ret"],
        pad_id=ids["pad"],
    )
    am = prompts["attention_mask"]
    P, T = am.shape[1], s.tokens.shape[1]
    gen_am = (jnp.arange(T)[None] < s.lengths[:, None]).astype(am.dtype)
    next_pos = jnp.max(jnp.where(am[None] > 0, prompts["positions"], -1), axis=(0, 2)) + 1
    gen_pos = jnp.broadcast_to((next_pos[:, None] + jnp.arange(T)[None])[None], (3, am.shape[0], T))
    inputs = dict(prompts)
    inputs["input_ids"] = jnp.concatenate([prompts["input_ids"], jnp.where(gen_am > 0, s.tokens, ids["pad"])], 1)
    inputs["attention_mask"] = jnp.concatenate([am, gen_am], 1)
    inputs["positions"] = jnp.concatenate([prompts["positions"], gen_pos.astype(prompts["positions"].dtype)], 2)
    h = backbone.forward(params, inputs, cfg, opts).hidden
    ret_pos = P + s.lengths - 1
    emb = l2_normalize(jnp.take_along_axis(h, ret_pos[:, None, None], axis=1)[:, 0])
    return emb, s.tokens, s.lengths


def corpus_pipeline_config(c, records: Sequence[dict], tok, opts, cfg) -> PipelineConfig:
    """The one-pass, one-host corpus pipeline of evaluation (the Embedder's and the T-CoT generator's):
    ``c`` is their config (batch size, buckets, patch rows, pixel and video settings); a patch budget only
    when some record has an image or a video; bad images fail; the model's patch geometry."""
    has_img = any(r["item"].get("image") or r["item"].get("video") for r in records)
    return PipelineConfig(
        batch_size=c.batch_size,
        micro_batches=1,
        seq_buckets=tuple(c.seq_buckets),
        patch_budget=(c.patch_rows or c.batch_size, c.patch_row_len) if has_img else None,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
        image_policy=ImagePolicy("fail"),
        drop_remainder=True,
        pad_token_id=tok.pad_token_id,
        position_mode=opts.position_mode,
        geometry=cfg.vision.geometry,  # the model's patches (Qwen3-VL: 16-pixel)
        min_pixels=c.min_pixels,
        max_pixels=c.max_pixels,
        **{k: getattr(c, k) for k in VIDEO_FIELDS},
    )


class Embedder:
    """Embeds record lists with one model; caches per (name) under a cache directory.

    Records may carry a ``video`` (a local file) on their side: it goes into the prompt and the patch
    budget like an image (:mod:`elva_jax.data.pipeline`), in every mode; ``video_inputs`` says so to the
    MMEB runner.

    identity: what names the weights (checkpoint path, step, weight files); it enters the fingerprint.
    cot: a T-CoT generator (`elva_jax.eval.cot.CoTGenerator`, with ``ecfg.tcot_request``): records get
    their CoTs (and evidence images) before they are embedded; its settings enter the fingerprint.
    stats[name] = {"n", "computed", "reused", "seconds", "items_per_s", "truncated"} of the last ``embed``
    call of that name (truncated: rows whose text was cut to fit max(seq_buckets)).
    """

    video_inputs = True  # video records are embedded (elva_jax.eval.mmeb scores video tasks)

    def __init__(
        self,
        params: dict,
        model_cfg: ModelConfig,
        tokenizer: Tokenizer,
        ecfg: EmbedConfig,
        *,
        opts: ModelOptions | None = None,
        identity: dict | None = None,
        mesh=None,
        log: Callable[[str], None] | None = None,
        cot=None,
    ):
        opts = opts or ModelOptions()
        if bool(ecfg.tcot_request) != (cot is not None):
            raise ValueError("EmbedConfig.tcot_request and a cot generator go together (Embed-RL's layout)")
        self.cot = cot
        self.cfg, self.tok, self.ecfg, self.opts, self.mesh = model_cfg, tokenizer, ecfg, opts, mesh
        self.identity = dict(identity or {})
        self.log = log or (lambda s: print(s, flush=True))
        self.stats: dict[str, dict] = {}
        self.last_truncated = 0
        if cot is not None:
            self.encoder = embedder_encoder(tokenizer, ecfg.tcot_request, videos=True)
        else:
            self.encoder = PromptEncoder(
                tokenizer, ecfg.mode, generation=ecfg.mode == "ret", default_instruction=ecfg.default_instruction
            )
        n_batch = 1
        if mesh is not None:
            from elva_jax.model.params import logical_axes
            from elva_jax.parallel.sharding import tree_shardings

            n_batch = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
            params = jax.device_put(params, tree_shardings(logical_axes(model_cfg), params, mesh))
        if ecfg.batch_size % n_batch:
            raise ValueError(f"eval batch_size {ecfg.batch_size} is not divisible by the {n_batch} batch devices")
        self.params = params
        if cot is not None or ecfg.mode != "ret":
            # one forward per batch: the hidden state at <emb> (T-CoT), before <emb>, or at the last real token
            emb_id, last = tokenizer.emb_token_id, ecfg.mode == "instruct_last"

            def fn(p, x):
                h = backbone.forward(p, x, model_cfg, opts).hidden
                if cot is not None:
                    return ret_embedding(h, x["input_ids"], emb_id, x["attention_mask"])
                if last:
                    return last_token_embedding(h, x["attention_mask"])
                return eol_embedding(h, x["input_ids"], emb_id, x["attention_mask"])

            self._forward = jax.jit(fn)
        else:
            ids = {"ret": tokenizer.ret_token_id, "eos": _QWEN2_EOS, "pad": tokenizer.pad_token_id}
            scfg = ecfg.sampler_config(cache_dtype=opts.dtype)  # KV cache in the compute dtype
            self._ret = jax.jit(lambda p, x, k: ret_embed(p, x, k, model_cfg, opts, scfg, ids))

    # ------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        return {
            **({"cot": self.cot.describe()} if self.cot is not None else {}),
            "format": _FORMAT,
            "identity": self.identity,
            "embed": self.ecfg.describe(),
            "model": {
                "dtype": self.opts.dtype,
                "position_mode": self.opts.position_mode,
                "hidden_size": self.cfg.text.hidden_size,
                "vocab_size": self.cfg.text.vocab_size,
            },
            "tokenizer": {
                "vocab_size": self.tok.vocab_size,
                "chat_template": "builtin" if not self.tok.chat_template else "custom",
            },
        }

    @property
    def fingerprint_sha(self) -> str:
        return _sha(self.fingerprint)

    def _pipeline_config(self, records: Sequence[dict]) -> PipelineConfig:
        return corpus_pipeline_config(self.ecfg, records, self.tok, self.opts, self.cfg)

    def _put(self, batch: dict):
        return put_batch(batch, self.mesh)

    def compute(self, records: Sequence[dict], *, salt: int = 0) -> tuple[np.ndarray, list[str] | None]:
        """Embeddings [n, D] float32 (and the decoded summaries in "ret" mode) of ``records``; no cache.

        salt: folded into the sampling key (with the batch index), so sampled summaries are reproducible.
        """
        records = list(records)
        if not records:
            raise ValueError("no records to embed")
        if self.cot is not None:
            records = self.cot.attach(records)
        b = self.ecfg.batch_size
        padded = records + [records[-1]] * ((-len(records)) % b)
        it = make_pipeline(padded, self.encoder, self.cfg, self._pipeline_config(padded), kind="corpus")
        embs, summaries, seen = [], [] if self.ecfg.mode == "ret" and self.cot is None else None, []
        base = jax.random.fold_in(jax.random.key(self.ecfg.seed), salt & 0x7FFFFFFF)
        progress = Progress("embed", total=len(padded), unit="records", every_s=30.0, log=self.log)
        for i, batch in enumerate(it):
            seen += it.last_ids
            progress.update(len(it.last_ids))
            if self.cot is not None or self.ecfg.mode != "ret":
                e = self._forward(self.params, self._put(batch))
            else:
                e, toks, lens = self._ret(self.params, self._put(_left_align(batch)), jax.random.fold_in(base, i))
                toks, lens = np.asarray(toks), np.asarray(lens)
                summaries += [self.tok.decode(t[: n - 1], skip_special_tokens=True) for t, n in zip(toks, lens)]
            embs.append(np.asarray(e, np.float32))
        self.last_truncated = it.stats.truncated  # rows cut to max(seq_buckets) (padding copies included)
        if [str(s) for s in seen] != [str(r["id"]) for r in padded]:
            raise RuntimeError("the corpus pipeline changed the record order (or dropped records)")
        out = np.concatenate(embs)[: len(records)]
        return out, (summaries[: len(records)] if summaries is not None else None)

    # ------------------------------------------------------------------------------------------------
    def embed(
        self, records: Sequence[dict], *, name: str, cache_dir: str | Path | None = None, cache: str = "use"
    ) -> np.ndarray | PartedArray:
        """Embeddings [n, D] of ``records`` (row i = records[i]); cached under ``cache_dir/name`` unless
        ``cache_dir`` is None or ``cache == "none"``. Prints a progress line per part (items/s)."""
        if cache not in CACHE_POLICIES:
            raise ValueError(f"cache must be one of {CACHE_POLICIES}, got {cache!r}")
        records = list(records)
        if not records:
            raise ValueError(f"{name}: no records to embed")
        st = self.stats[name] = {"n": len(records), "computed": 0, "reused": 0, "seconds": 0.0}
        t_start = time.perf_counter()
        S = self.ecfg.part_size
        n_parts = -(-len(records) // S)
        salt0 = zlib.crc32(name.encode())
        if cache_dir is None or cache == "none":
            outs = []
            for p in range(n_parts):
                chunk = records[p * S : (p + 1) * S]
                outs.append(self._compute_logged(chunk, name, p, n_parts, st, len(records), salt0)[0])
            st["seconds"] += time.perf_counter() - t_start
            return np.concatenate(outs)

        d = Path(cache_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        index_path = d / "index.json"
        digest = records_digest(records)
        ids = [str(r["id"]) for r in records]
        index = self._open_index(index_path, digest, len(records), cache)
        if index is None:
            index = {
                "format": _FORMAT,
                "fingerprint": self.fingerprint,
                "fingerprint_sha": self.fingerprint_sha,
                "records_sha": digest,
                "n": len(records),
                "part_size": S,
                "dim": None,
                "ids": ids,
                "parts": {},
            }
            _write_json(index_path, index)
        for p in range(n_parts):
            key = f"{p:05d}"
            entry = index["parts"].get(key)
            path = d / f"part-{key}.npy"
            start, stop = p * S, min((p + 1) * S, len(records))
            if entry is not None:
                problem = _check_part(path, entry, stop - start, index.get("dim"))
                if problem is None:
                    st["reused"] += stop - start
                    continue
                if cache == "use":
                    raise CacheError(
                        f"{path}: embedding cache part listed as finished in {index_path} is {problem}; "
                        f"rerun with cache=repair (--cache repair) to recompute it, or delete {d}"
                    )
                self.log(f"[elva_jax.eval] cache {path} is {problem}: recomputing it")
                del index["parts"][key]
            emb, summ = self._compute_logged(records[start:stop], name, p, n_parts, st, len(records), salt0)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(emb, np.float32))
            data = buf.getvalue()
            _atomic_write(path, data)
            if summ is not None:
                _write_json(d / f"part-{key}.summaries.json", {"ids": ids[start:stop], "summaries": summ})
            index["dim"] = int(emb.shape[1])
            index["parts"][key] = {
                "file": path.name,
                "start": start,
                "stop": stop,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            _write_json(index_path, index)
        st["seconds"] += time.perf_counter() - t_start
        return PartedArray([d / f"part-{p:05d}.npy" for p in range(n_parts)], int(index["dim"]))

    def _open_index(self, index_path: Path, digest: str, n: int, cache: str) -> dict | None:
        if not index_path.exists():
            return None
        try:
            index = json.loads(index_path.read_text())
            assert isinstance(index, dict) and isinstance(index.get("parts"), dict)
        except (OSError, ValueError, AssertionError) as e:
            if cache == "repair":
                self.log(f"[elva_jax.eval] {index_path} is unreadable ({e}): starting this cache afresh")
                return None
            raise CacheError(f"{index_path}: unreadable cache index ({e}); use cache=repair or delete it") from None
        if index.get("fingerprint_sha") != self.fingerprint_sha:
            diff = _diff_keys(index.get("fingerprint") or {}, self.fingerprint)
            raise CacheError(
                f"{index_path}: cache written for another model or settings (differs in: {', '.join(diff) or '?'}); "
                "use another cache directory or delete this one"
            )
        if index.get("records_sha") != digest or index.get("n") != n or index.get("part_size") != self.ecfg.part_size:
            raise CacheError(
                f"{index_path}: cache written for other records ({index.get('n')} records, part size "
                f"{index.get('part_size')}; now {n}, {self.ecfg.part_size}); use another name or delete it"
            )
        return index

    def _compute_logged(self, chunk, name, p, n_parts, st, n_total, salt0):
        t0 = time.perf_counter()
        emb, summ = self.compute(chunk, salt=salt0 + p)
        dt = time.perf_counter() - t0
        st["computed"] += len(chunk)
        st["truncated"] = st.get("truncated", 0) + self.last_truncated
        st["compute_seconds"] = st.get("compute_seconds", 0.0) + dt
        rate = st["computed"] / max(st["compute_seconds"], 1e-9)
        st["items_per_s"] = rate
        done = st["computed"] + st["reused"]
        eta = (n_total - done) / max(rate, 1e-9)
        mode = "tcot" if self.cot is not None else self.ecfg.mode
        self.log(
            f"[elva_jax.eval] embed {name} ({mode}): part {p + 1}/{n_parts}, {done}/{n_total} items, "
            f"{rate:.1f} items/s, eta {eta:.0f}s"
        )
        return emb, summ


def _check_part(path: Path, entry: dict, rows: int, dim: int | None) -> str | None:
    """None if the part file matches its index entry, else what is wrong with it."""
    if not path.exists():
        return "missing"
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e})"
    if len(data) != entry.get("bytes"):
        return f"corrupt (size {len(data)} bytes, index says {entry.get('bytes')})"
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return "corrupt (sha256 mismatch)"
    try:
        arr = np.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any unreadable npy is corrupt
        return f"corrupt ({e})"
    if arr.shape != (rows, dim) or arr.dtype != np.float32:
        return f"corrupt (array {arr.shape} {arr.dtype}, expected ({rows}, {dim}) float32)"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())
