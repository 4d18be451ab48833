"""Embedding corpora (queries or pool candidates) for evaluation, with a resumable on-disk cache.

Three modes (:class:`elva_jax.eval.embed_config.EmbedConfig` ``.mode``):

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

With a T-CoT generator (``EmbedConfig.tcot_request``, :mod:`elva_jax.eval.cot`) the convention is Embed-RL's
("tcot"): each side + its T-CoT + the summarise request, the hidden state at ``<emb>``.

Records are ``{"id", "item": {"text", "image", "instruction"}}`` (:func:`elva_jax.data.records.corpus_records`),
the item optionally with ``"video"`` (a local video file; prompt and patch budget as for an image).
They go through the corpus pipeline (``make_pipeline(kind="corpus")``, no shuffle, image policy
``fail``; :mod:`elva_jax.eval.corpus`) in batches of ``batch_size`` padded to a sequence bucket and a fixed
patch budget (the record list is padded with copies of its last record, so every batch is full and a run
compiles one program per bucket). With a ``mesh`` the batch axis is split over ``("data", "fsdp")`` and
the params follow :mod:`elva_jax.parallel.sharding`.

The cache (``Embedder.embed(records, name=..., cache_dir=...)``): parts of ``part_size`` records under
``{cache_dir}/{name}/``, an index naming the fingerprint and the finished parts; resumable, and a missing or
corrupt finished part is an error (``cache="use"``) or recomputed (``cache="repair"``); layout and rules in
:mod:`elva_jax.eval.embed_cache`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.data.conventions import Convention, convention
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.pipeline.config import PipelineConfig
from elva_jax.data.pipeline.iterator import make_pipeline
from elva_jax.data.progress import Progress
from elva_jax.data.tcot.encoders import embedder_encoder
from elva_jax.data.tokenize import Tokenizer
from elva_jax.eval.corpus import batch_devices, corpus_pipeline_config, left_align, place_params, put_batch
from elva_jax.eval.embed_cache import (
    CACHE_FORMAT,
    CacheError,
    PartedArray,
    fingerprint_sha,
    new_index,
    open_index,
    records_digest,
    reuse_part,
    write_json,
    write_part,
)
from elva_jax.eval.embed_config import EmbedConfig
from elva_jax.model import backbone
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.embedding import l2_normalize
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.schema import CACHE_POLICIES

# Embedder is defined here; the rest are re-exported from embed_cache / embed_config, where they live
__all__ = ["CACHE_POLICIES", "CacheError", "EmbedConfig", "Embedder", "PartedArray", "records_digest"]


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


# ----------------------------------------------------------------------------------------------------
# the embedding conventions: which prompt, which hidden state


def _prompt_encoder(tokenizer: Tokenizer, ecfg: EmbedConfig, conv: Convention):
    """The prompt encoder of a convention (`elva_jax.data.conventions`): Embed-RL's embedder rows for "tcot",
    else its PromptEncoder template (an open assistant turn when the model writes first, "ret")."""
    if conv.template == "tcot":
        return embedder_encoder(tokenizer, ecfg.tcot_request, videos=True)
    return PromptEncoder(
        tokenizer, conv.template, generation=conv.generates, default_instruction=ecfg.default_instruction
    )


def _pooled_forward(model_cfg: ModelConfig, opts: ModelOptions, tokenizer: Tokenizer, conv: Convention):
    """The jitted one-forward embedding (params, batch) -> [B, D] of a convention whose model does not write
    first: the L2-normalised hidden state the convention pools."""

    def fn(p, x):
        h = backbone.forward(p, x, model_cfg, opts).hidden
        return conv.pool(
            h,
            x["input_ids"],
            x["attention_mask"],
            emb_token_id=tokenizer.emb_token_id,
            ret_token_id=tokenizer.ret_token_id,
        )

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------------------


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
        conv = convention(self.convention)
        self.encoder = _prompt_encoder(tokenizer, ecfg, conv)
        self.params = place_params(params, model_cfg, mesh)
        n_batch = batch_devices(mesh)
        if ecfg.batch_size % n_batch:
            raise ValueError(f"eval batch_size {ecfg.batch_size} is not divisible by the {n_batch} batch devices")
        if not conv.generates:
            self._forward = _pooled_forward(model_cfg, opts, tokenizer, conv)
        else:
            ids = {"ret": tokenizer.ret_token_id, "eos": tokenizer.im_end_token_id, "pad": tokenizer.pad_token_id}
            scfg = ecfg.sampler_config(cache_dtype=opts.dtype)  # KV cache in the compute dtype
            self._ret = jax.jit(lambda p, x, k: ret_embed(p, x, k, model_cfg, opts, scfg, ids))

    # ------------------------------------------------------------------------------------------------
    @property
    def convention(self) -> str:
        """The embedding convention: "tcot" with a T-CoT generator, else the mode ("eol", "ret", "instruct_last")."""
        return "tcot" if self.cot is not None else self.ecfg.mode

    @property
    def fingerprint(self) -> dict:
        return {
            **({"cot": self.cot.describe()} if self.cot is not None else {}),
            "format": CACHE_FORMAT,
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
        return fingerprint_sha(self.fingerprint)

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
        embs, summaries, seen = [], [] if self.convention == "ret" else None, []
        base = jax.random.fold_in(jax.random.key(self.ecfg.seed), salt & 0x7FFFFFFF)
        progress = Progress("embed", total=len(padded), unit="records", every_s=30.0, log=self.log)
        for i, batch in enumerate(it):
            seen += it.last_ids
            progress.update(len(it.last_ids))
            if self.convention != "ret":
                e = self._forward(self.params, self._put(batch))
            else:
                e, toks, lens = self._ret(self.params, self._put(left_align(batch)), jax.random.fold_in(base, i))
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
        if cache_dir is None or cache == "none":
            out = self._embed_uncached(records, name, st)
        else:
            out = self._embed_cached(records, name, st, Path(cache_dir) / name, cache)
        st["seconds"] += time.perf_counter() - t_start
        return out

    def _embed_uncached(self, records: list[dict], name: str, st: dict) -> np.ndarray:
        """``embed`` without a cache: every part computed, nothing written."""
        S = self.ecfg.part_size
        n_parts = -(-len(records) // S)
        salt0 = zlib.crc32(name.encode())
        outs = []
        for p in range(n_parts):
            chunk = records[p * S : (p + 1) * S]
            outs.append(self._compute_logged(chunk, name, p, n_parts, st, len(records), salt0)[0])
        return np.concatenate(outs)

    def _embed_cached(self, records: list[dict], name: str, st: dict, d: Path, cache: str) -> PartedArray:
        """``embed`` with the cache in ``d``: finished parts reused, the others computed, written and recorded
        in the index one by one (:mod:`elva_jax.eval.embed_cache`)."""
        S = self.ecfg.part_size
        n_parts = -(-len(records) // S)
        salt0 = zlib.crc32(name.encode())
        d.mkdir(parents=True, exist_ok=True)
        index_path = d / "index.json"
        digest = records_digest(records)
        ids = [str(r["id"]) for r in records]
        index = open_index(index_path, self.fingerprint, digest, len(records), S, cache, self.log)
        if index is None:
            index = new_index(self.fingerprint, digest, ids, S)
            write_json(index_path, index)
        for p in range(n_parts):
            key = f"{p:05d}"
            path = d / f"part-{key}.npy"
            start, stop = p * S, min((p + 1) * S, len(records))
            if reuse_part(index, key, path, stop - start, cache, self.log):
                st["reused"] += stop - start
                continue
            emb, summ = self._compute_logged(records[start:stop], name, p, n_parts, st, len(records), salt0)
            entry = write_part(path, emb, start, stop)
            if summ is not None:
                write_json(d / f"part-{key}.summaries.json", {"ids": ids[start:stop], "summaries": summ})
            index["dim"] = int(emb.shape[1])
            index["parts"][key] = entry
            write_json(index_path, index)
        return PartedArray([d / f"part-{p:05d}.npy" for p in range(n_parts)], int(index["dim"]))

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
        self.log(
            f"[elva_jax.eval] embed {name} ({self.convention}): part {p + 1}/{n_parts}, {done}/{n_total} items, "
            f"{rate:.1f} items/s, eta {eta:.0f}s"
        )
        return emb, summ
