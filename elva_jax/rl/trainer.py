"""One ELVA RL step on the host: rollouts -> re-forward -> rewards -> GRPO update(s), timed by phase.

Passes (rl.old_logp, rl.ret_embedding; the defaults run none that the math does not need): the
sampler returns the [RET] embeddings with the tokens, and with mu = 1 the update is on-policy
(old log-probs = stop_gradient of its own), so the re-forward is only the reference pass (beta > 0).
"recompute" restores the teacher-forced policy pass for either quantity (the oracle of the fast path).

Instances are records {"id", "query": side, "cands": [positive, *negatives]} (sides as in
`elva_jax.data.pipeline`). For each instance the S = 1 + C distinct prompts (query, candidates; ELVA
generative template with an open assistant turn) are prefilled once and sampled G times
(`candidate_sampling="per_rollout"`, the paper). With `"shared"`, candidate summaries are sampled once
and reused by all G rollouts: only the query summary varies, candidate sequences then carry the mean
of their group's advantages (zero by construction), so they only feel the KL term.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.errors import ImageError, RecordError
from elva_jax.data.media.image_processing import load_image, load_image_bytes, preprocess_image
from elva_jax.data.media.settings import MediaSettings
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.inputs import build_inputs, input_axes, pack_images
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.parallel.sharding import fitting_sharding, place, replicated
from elva_jax.rl.rewards import RewardConfig, reward_from_config
from elva_jax.rl.rollout import (
    RLConfig,
    prompt_major_to_rollouts,
    rewards_and_advantages,
    rl_loss_and_grad,
    rollout_similarities,
    split_instances,
    teacher_forced_shared,
)


@dataclasses.dataclass
class RLState:
    step: int
    params: dict  # frozen base (also the reference policy); under full fine-tuning the frozen reference copy
    lora: dict  # the trainable: LoRA adapters, or (full fine-tuning) the policy's own full param tree
    opt_state: Any
    key: jax.Array
    skipped: int = 0  # updates skipped because the loss, gradient or update was not finite


def side_image(side: dict):
    """A side's image: decoded from ``image_bytes`` when it carries them (prepared sources; ``where``
    names the shard and row; None: missing when it was prepared), else opened from the file ``image``."""
    if "image_bytes" not in side:
        return load_image(side["image"])
    if side["image_bytes"] is None:
        raise ImageError(f"image {side['image']} was missing when {side.get('where')} was prepared")
    return load_image_bytes(side["image_bytes"], f"{side['image']} (in {side.get('where')})")


def encode_prompts(sides, encoder, *, min_pixels, max_pixels, buckets: tuple[int, ...], pad_id: int, geometry):
    """Left-padded generation prompts, padded to the smallest length bucket that fits (static shapes).

    Returns (ids [n, P], attention mask [n, P], per-row pixel arrays or None, per-row grids or None).
    """
    rows, pvs, grids = [], [], []
    for side in sides:
        pv = g = None
        if side.get("video") is not None or side.get("video_data") is not None:  # never dropped in silence
            raise RecordError(
                f"{side.get('where') or 'an RL side'}: video {side.get('video')!r}: the RL stage's rollouts do not "
                "take video sides yet (its prompt batches carry no video arrays); drop video records from the RL data"
            )
        if side.get("image"):
            pv, g = preprocess_image(side_image(side), min_pixels=min_pixels, max_pixels=max_pixels, geometry=geometry)
            g = np.asarray(g)[None]
        row, _ = encoder.encode(side, pv, g, max(buckets))
        rows.append(row["input_ids"])
        pvs.append(pv)
        grids.append(g)
    longest = max(len(r) for r in rows)
    P = min(b for b in buckets if b >= longest)
    ids = np.full((len(rows), P), pad_id, np.int32)
    am = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :], am[i, P - len(r) :] = r, 1
    return ids, am, pvs, grids


def model_inputs(cfg, opts, ids, am, pvs, grids, row_len: int):
    """Model inputs with images packed one row per sequence into [n, row_len] patch slots.

    The patch arrays are present even when no row has an image, so every batch of the same prompt
    bucket has the same structure and shapes (one compiled program per bucket).
    """
    with_img = [i for i, p in enumerate(pvs) if p is not None]
    pv = np.concatenate([pvs[i] for i in with_img]) if with_img else np.zeros((0, cfg.vision.patch_dim), np.float32)
    g = np.concatenate([grids[i] for i in with_img]) if with_img else np.zeros((0, 3), np.int64)
    out = build_inputs(cfg, opts, ids, am, pv if with_img else None, g if with_img else None)
    out.update(pack_images(pv, g, rows=len(ids), row_len=row_len, cfg=cfg))
    return out


def put_rows(tree, mesh, prompts: bool = False):
    """Host or global arrays -> arrays on ``mesh`` with their rows over the batch axes where they divide
    (``prompts``: model inputs, laid out by their input axes). A dict of arrays or one array; no-op
    without a mesh."""
    if mesh is None:
        return tree

    def axes(name, x):
        if prompts:
            return input_axes(name, np.ndim(x))
        return ("batch",) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else ()

    if isinstance(tree, dict):
        sh = {k: fitting_sharding(np.shape(v), axes(k, v), mesh) for k, v in tree.items()}
    else:
        sh = fitting_sharding(np.shape(tree), axes(None, tree), mesh)
    return place(tree, sh)


def constrain_micro_batches(micro: dict, mesh) -> dict:
    """Inside jit: rows of each micro-batch over the batch axes, the micro-batch axis whole (so the
    scan slices one micro-batch without gathering rows across devices). No-op without a mesh."""
    if mesh is None:
        return micro
    wsc = jax.lax.with_sharding_constraint

    def rows(x, axes):
        return wsc(x, fitting_sharding(x.shape, (None, *axes), mesh))

    per_row = [k for k in micro if k not in ("prompts", "valid")]
    out = {k: rows(micro[k], ("batch",) + (None,) * (micro[k].ndim - 2)) for k in per_row}
    out["valid"] = rows(micro["valid"], (None, None))
    out["prompts"] = {k: rows(v, input_axes(k, v.ndim - 1)) for k, v in micro["prompts"].items()}
    return out


def rl_update(lora, opt_state, params, batch: dict, *, shape, tx, rcfg: RLConfig, mesh=None, **loss_kw):
    """One GRPO update of the LoRA (pure; jit it): the batch split into ``rcfg.micro_instances``
    micro-batches, the exact accumulated gradient (`rl_loss_and_grad`), then the optimizer, skipped
    (metrics["finite"] False) when the loss, gradient or update is not finite.
    ``loss_kw``: cfg, opts, reward_cfg, lora_scale. Returns (lora, opt_state, metrics)."""
    micro = constrain_micro_batches(split_instances(batch, shape, rcfg.micro_instances), mesh)
    loss, m, g = rl_loss_and_grad(lora, params, micro, rcfg=rcfg, shape=shape, **loss_kw)
    upd, new_opt = tx.update(g, opt_state, lora)
    grad_norm = optax.tree.norm(g)
    # a non-finite loss, gradient or update (NaN rewards or KL, a NaN learning rate) leaves the LoRA and
    # the optimizer state as they were; the step is counted as skipped
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(upd))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_lora = keep(optax.apply_updates(lora, upd), lora)
    return new_lora, keep(new_opt, opt_state), {**m, "grad_norm": grad_norm, "finite": finite}


_LAMRA_MEDIA = MediaSettings()  # the default media settings (LamRA's pixel limits and patch row)


class RLTrainer:
    """Holds the jitted pieces for fixed shapes; `step(state, instances)` runs one RL step.

    With a ``mesh``, the state must already be laid out on it (see `elva_jax.rl.loop.place_rl_state`);
    each step's inputs are placed with their rows over the batch axes (replicated where the row
    count does not divide them), and sampled tokens, log-probs and embeddings come back replicated so
    every process computes the same rewards. Every process builds the same step inputs.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        opts: ModelOptions,
        rcfg: RLConfig,
        reward_cfg: RewardConfig,
        tx: optax.GradientTransformation,
        encoder,
        *,
        lora_scale: float,
        ret_id: int,
        eos_id: int,
        pad_id: int,
        prompt_buckets: tuple[int, ...] = (128, 256, 512),
        media: MediaSettings = _LAMRA_MEDIA,
        mesh=None,
        full_finetune: bool = False,
        sample_embeddings: bool = True,
    ):
        """``media``: the prompts' image pixel limits and patch row (the run's ``data.*``; RL sides take no
        video). ``full_finetune``: ``state.lora`` holds the policy's whole param tree (trained) and
        ``state.params`` the frozen reference (a copy of the initial params): every policy pass runs on
        ``state.lora`` with no adapter, the reference pass on ``state.params``. ``sample_embeddings``
        False: the sampler never builds [RET] embeddings (a recipe that does not use them)."""
        self.mesh = mesh
        self.last_samples = None
        self.full_finetune = full_finetune
        # (base, adapter) of a pass: the policy is (params, lora) or, fully fine-tuned, (lora, None); the
        # reference is called with lora None and so is (params, None) either way
        pl = (lambda p, lo: (lo, None) if lo is not None else (p, None)) if full_finetune else (lambda p, lo: (p, lo))
        rep = {} if mesh is None else {"out_shardings": replicated(mesh)}
        self.cfg, self.opts, self.rcfg, self.reward_cfg, self.tx = cfg, opts, rcfg, reward_cfg, tx
        self.encoder, self.lora_scale = encoder, lora_scale
        self.ret_id, self.eos_id, self.pad_id = ret_id, eos_id, pad_id
        self.buckets, self.media, self.row_len = tuple(sorted(prompt_buckets)), media, media.patch_row_len
        if rcfg.ret_embedding not in ("sampler", "recompute"):
            raise ValueError(f"rl.ret_embedding must be 'sampler' or 'recompute', got {rcfg.ret_embedding!r}")
        rcfg.recompute_old_logp()  # checks rl.old_logp
        if rcfg.cache_dtype not in ("compute", "float32", "bfloat16"):
            raise ValueError(f"rl.cache_dtype must be compute, float32 or bfloat16, got {rcfg.cache_dtype!r}")
        self.scfg = SamplerConfig(
            max_new_tokens=rcfg.max_summary_tokens,
            temperature=rcfg.temperature,
            top_k=rcfg.top_k,
            top_p=rcfg.top_p,
            cache_dtype=opts.dtype if rcfg.cache_dtype == "compute" else rcfg.cache_dtype,
            mesh=mesh,
        )
        self._gen = jax.jit(
            lambda p, lo, x, k, g: generate(
                pl(p, lo)[0],
                x,
                k,
                cfg,
                opts,
                self.scfg,
                num_samples=g,
                stop_ids=(ret_id, eos_id),
                ret_id=ret_id,
                pad_id=pad_id,
                lora=pl(p, lo)[1],
                lora_scale=lora_scale,
                ret_embedding=sample_embeddings and rcfg.ret_embedding == "sampler",
            ),
            static_argnums=(4,),
            **rep,
        )
        self._tf = jax.jit(
            lambda p, lo, x, t, n, g: teacher_forced_shared(*pl(p, lo), lora_scale, x, t, n, g, cfg, opts, rcfg),
            static_argnums=(5,),
            **rep,
        )
        self._tf_emb = jax.jit(  # the [RET] embeddings only (no LM head)
            lambda p, lo, x, t, n, g: teacher_forced_shared(*pl(p, lo), lora_scale, x, t, n, g, cfg, opts, rcfg, False)[
                1
            ],
            static_argnums=(5,),
            **rep,
        )

        def update(lora, opt_state, params, batch, shape):
            return rl_update(
                lora,
                opt_state,
                params,
                batch,
                shape=shape,
                tx=tx,
                mesh=mesh,
                cfg=cfg,
                opts=opts,
                rcfg=rcfg,
                reward_cfg=reward_cfg,
                lora_scale=lora_scale,
                full_finetune=full_finetune,
            )

        self._update_fn = update
        self._update = None if mesh is not None else jax.jit(update, static_argnums=(4,), donate_argnums=(0, 1))

    def _update_for(self, state: RLState):
        """The jitted update; on a mesh its LoRA / optimizer outputs keep the state's layout, so the
        next step's inputs have the same shardings (one compile per shape)."""
        if self._update is None:
            keep = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
            self._update = jax.jit(
                self._update_fn,
                static_argnums=(4,),
                donate_argnums=(0, 1),
                out_shardings=(keep(state.lora), keep(state.opt_state), replicated(self.mesh)),
            )
        return self._update

    @classmethod
    def from_tokenizer(cls, cfg, opts, rcfg, reward_cfg, tx, tokenizer, **kw) -> RLTrainer:
        """The trainer with the ELVA generation prompt encoder and the [RET] / <|im_end|> / pad ids of
        ``tokenizer`` (`elva_jax.data.tokenize.Tokenizer`); ``kw`` as for the constructor."""
        return cls(
            cfg,
            opts,
            rcfg,
            reward_cfg,
            tx,
            PromptEncoder(tokenizer, "ret", generation=True),
            ret_id=tokenizer.ret_token_id,
            eos_id=tokenizer.im_end_token_id,
            pad_id=tokenizer.pad_token_id,
            **kw,
        )

    def _put(self, tree, prompts: bool = False):
        return put_rows(tree, self.mesh, prompts)

    def encode_instances(self, instances: list[dict]):
        """The generation prompts of every side (query, then each candidate) of every instance, in that
        order: (input_ids [I*S, P], attention_mask, pixel_values, image_grid_thw) as `encode_prompts`."""
        sides = [s for inst in instances for s in [inst["query"], *inst["cands"]]]
        return encode_prompts(
            sides,
            self.encoder,
            min_pixels=self.media.min_pixels,
            max_pixels=self.media.max_pixels,
            buckets=self.buckets,
            pad_id=self.pad_id,
            geometry=self.cfg.vision.geometry,
        )

    def rollouts(self, state: RLState, instances: list[dict], samples=None):
        """Sample every sequence of every rollout, ``rl.micro_instances`` instances per sampler call.

        ``samples``: given samples (`Samples` of host arrays, prompt-major, as this method returns) to
        use instead of sampling (the step is then a function of them alone; the key still advances).

        Returns (samples as host arrays, prompt-major [instance, sequence, sample]; the prompt inputs
        of the update (the D = I * S prompts, or per chunk stacked [M, ...]); (I, G, S); the prompt
        inputs of each instance chunk, for the chunked re-forward).
        """
        rc = self.rcfg
        I, C, G = len(instances), len(instances[0]["cands"]), rc.group_size
        S = 1 + C
        m = rc.micro_instances or I
        if I % m:
            raise ValueError(f"{I} instances per step do not split into micro-batches of {m} (rl.micro_instances)")
        ids, am, pvs, grids = self.encode_instances(instances)  # [I*S] sides

        def sub(rows):  # patches are packed, not one row per sequence: rebuild from the raw rows
            x = model_inputs(
                self.cfg, self.opts, ids[rows], am[rows], [pvs[r] for r in rows], [grids[r] for r in rows], self.row_len
            )
            return self._put(x, prompts=True)

        n_chunks = I // m
        chunks = [sub(np.arange(c * m * S, (c + 1) * m * S)) for c in range(n_chunks)]
        key, k1, k2 = jax.random.split(state.key, 3)
        state.key = key
        outs = []
        if samples is not None:
            if np.shape(samples.tokens)[0] != I * S * G:
                raise ValueError(f"given samples have {np.shape(samples.tokens)[0]} rows, the step needs {I * S * G}")
            return jax.tree.map(np.asarray, samples), self._update_prompts(chunks), (I, G, S), chunks
        for c in range(n_chunks):
            kc1, kc2 = (k1, k2) if n_chunks == 1 else (jax.random.fold_in(k1, c), jax.random.fold_in(k2, c))
            if rc.candidate_sampling == "per_rollout":
                outs.append(jax.tree.map(np.asarray, self._gen(state.params, state.lora, chunks[c], kc1, G)))
            elif rc.candidate_sampling == "shared":
                base = c * m * S
                qi = base + np.arange(m) * S
                ci = np.array([base + i * S + 1 + j for i in range(m) for j in range(C)])
                q_out = jax.tree.map(np.asarray, self._gen(state.params, state.lora, sub(qi), kc1, G))
                c_out = jax.tree.map(np.asarray, self._gen(state.params, state.lora, sub(ci), kc2, 1))
                qa = jax.tree.map(lambda x: x.reshape(m, 1, G, *x.shape[1:]), q_out)
                ca = jax.tree.map(
                    lambda x: np.broadcast_to(x.reshape(m, C, 1, *x.shape[1:]), (m, C, G, *x.shape[1:])), c_out
                )
                outs.append(
                    jax.tree.map(lambda a, b: np.concatenate([a, b], 1).reshape(m * S * G, *a.shape[3:]), qa, ca)
                )
            else:
                raise ValueError(f"candidate_sampling must be per_rollout or shared, got {rc.candidate_sampling!r}")
        out = outs[0] if n_chunks == 1 else jax.tree.map(lambda *xs: np.concatenate(xs, 0), *outs)
        return out, self._update_prompts(chunks), (I, G, S), chunks

    @staticmethod
    def _update_prompts(chunks):
        """The update's prompts: the inputs as they are, or (several chunks; images are packed per
        chunk) each chunk's inputs stacked [M, ...]."""
        return chunks[0] if len(chunks) == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *chunks)

    def reforward(
        self,
        state: RLState,
        chunks: list[dict],
        tokens: np.ndarray,
        lengths: np.ndarray,
        G: int,
        *,
        logps: bool = True,
        embeddings: bool = True,
    ):
        """(policy log-probs, reference log-probs or None, [RET] embeddings) of the sampled rows, one
        instance chunk at a time (rows are prompt-major, so chunk c is a contiguous block).

        The policy pass (LoRA) runs when ``logps`` or ``embeddings`` is asked for (the LM head only for
        ``logps``; what is not asked for is None); the reference pass (no LoRA) only when rl.beta > 0.
        The reference cannot reuse the policy's prompt prefill: the LoRA is on the LLM's projections,
        so every prompt token's keys and values differ between the two (only the vision tower's patch
        embeddings are common, a small part of the prefill on the RL workloads)."""
        n = len(tokens) // len(chunks)
        olds, refs, embs = [], [], []
        for c, x in enumerate(chunks):
            t, ln = self._put(tokens[c * n : (c + 1) * n]), self._put(lengths[c * n : (c + 1) * n])
            if logps:
                old, emb = self._tf(state.params, state.lora, x, t, ln, G)
                olds.append(old)
                embs.append(emb)
            elif embeddings:
                embs.append(self._tf_emb(state.params, state.lora, x, t, ln, G))
            if self.rcfg.beta:
                refs.append(self._tf(state.params, None, x, t, ln, G)[0])
        cat = lambda xs: (xs[0] if len(xs) == 1 else jnp.concatenate(xs, 0)) if xs else None  # noqa: E731
        return cat(olds), cat(refs), (cat(embs) if embeddings else None)

    def apply_update(self, state: RLState, prompts, rows: dict, valid, shape) -> tuple[dict, bool]:
        """The step's ``rl.mu`` GRPO updates of ``state`` (in place) from its prompt inputs and per-row arrays
        (host or device; placed on the mesh here), then ``state.step`` + 1 and the skip count. Returns (the
        last update's metrics without "finite", whether that update was skipped as non-finite)."""
        rows = self._put(rows) if self.mesh is not None else {k: jnp.asarray(v) for k, v in rows.items()}
        batch = {"prompts": prompts, **rows, "valid": valid}
        m = {}
        for _ in range(self.rcfg.mu):
            update = self._update_for(state)
            state.lora, state.opt_state, m = update(state.lora, state.opt_state, state.params, batch, shape)
        jax.block_until_ready(state.lora)
        state.step += 1
        skipped_now = not bool(m.pop("finite", True))
        state.skipped += int(skipped_now)
        return m, skipped_now

    def probe(self, state: RLState, instances, key: jax.Array, chunk: int) -> dict:
        """The policy's expected reward on fixed ``instances`` (no update; ``state`` is left as it is):
        G rollouts each, sampled with ``key`` folded with the chunk's offset (the same draws at every call
        for the same policy, so differences between calls are the policy's, not the draw's), ``chunk``
        instances per sampler call. Returns the means over instances and rollouts of the total reward,
        its margin and ranking parts, and ``top1``: the share of rollouts whose positive ranks first
        (exact ties go to the lower candidate index, the positive, as in the ranking reward)."""
        sums: dict[str, float] = {"reward": 0.0, "margin": 0.0, "ranking": 0.0, "top1": 0.0}
        n = 0
        for c in range(0, len(instances), chunk):
            part = [instances[i] for i in range(c, min(c + chunk, len(instances)))]
            st = dataclasses.replace(state, key=jax.random.fold_in(key, c))
            out, _, (I, G, S), chunks = self.rollouts(st, part)
            emb = out.ret_emb
            if emb is None or self.rcfg.ret_embedding == "recompute":
                _, _, emb = self.reforward(st, chunks, out.tokens, out.lengths, G, logps=False, embeddings=True)
            sims = rollout_similarities(prompt_major_to_rollouts(jnp.asarray(emb), I, G, S), I, G, S)
            total, parts = reward_from_config(sims, self.reward_cfg, jnp.ones((I, 1, S - 1), bool))
            top1 = sims[..., 0] >= jnp.max(sims[..., 1:], axis=-1)
            for k, v in (("reward", total), ("margin", parts["margin"]), ("ranking", parts["ranking"]), ("top1", top1)):
                sums[k] += float(jnp.sum(v.astype(jnp.float32)))
            n += I * G
        return {f"probe_{k}": v / n for k, v in sums.items()}

    @staticmethod
    def log_line(m: dict) -> str:
        """The loop's one-line step summary (after "RL step s/n")."""
        return (
            f"reward {m['reward']:.4f} (margin {m['reward_margin']:.3f}, ranking {m['reward_ranking']:.3f}) "
            f"kl {m['kl_mean']:.4f} len {m['summary_len']:.1f} | rollout {m['time_rollout_s']:.2f}s re-forward "
            f"{m['time_reforward_s']:.2f}s reward {m['time_reward_s']:.3f}s update {m['time_update_s']:.2f}s"
        )

    @staticmethod
    def probe_line(p: dict) -> str:
        """The loop's one-line probe summary."""
        return (
            f"reward {p['probe_reward']:.4f} (margin {p['probe_margin']:.4f}, ranking {p['probe_ranking']:.4f}) "
            f"positive first {p['probe_top1']:.3f}"
        )

    def step(
        self, state: RLState, instances: list[dict], valid: np.ndarray | None = None, samples=None
    ) -> tuple[RLState, dict]:
        """One RL step. ``samples``: replay given samples instead of sampling (see `rollouts`). The
        step's samples (host arrays) stay in ``self.last_samples``, so another run can replay them."""
        rc = self.rcfg
        t0 = time.perf_counter()
        out, prompts, shape, chunks = self.rollouts(state, instances, samples)
        self.last_samples = out
        I, G, S = shape
        t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        need_old = rc.recompute_old_logp()
        # replayed samples without embeddings (or rl.ret_embedding=recompute): the teacher-forced pass
        need_emb = rc.ret_embedding == "recompute" or out.ret_emb is None
        old_logp, ref_logp, emb = self.reforward(
            state, chunks, out.tokens, out.lengths, G, logps=need_old, embeddings=need_emb
        )
        emb = out.ret_emb if emb is None else emb
        ref_logp = jnp.zeros(np.shape(out.tokens), jnp.float32) if ref_logp is None else ref_logp
        tokens, lengths = out.tokens, out.lengths
        jax.block_until_ready((old_logp, ref_logp, emb))
        t_reforward = time.perf_counter() - t1
        t2 = time.perf_counter()
        valid = np.ones((I, S - 1), bool) if valid is None else valid
        valid = place(valid, replicated(self.mesh)) if self.mesh is not None else jnp.asarray(valid)
        sims = rollout_similarities(prompt_major_to_rollouts(emb, I, G, S), I, G, S)
        total, parts, adv, zero_var = rewards_and_advantages(sims, valid[:, None, :], rc, self.reward_cfg)
        adv_rows = jnp.broadcast_to(adv[:, None, :], (I, S, G))  # prompt-major: row (i, s, g) gets A[i, g]
        if rc.candidate_sampling == "shared":  # shared candidate summaries: their group's mean advantage (0)
            adv_rows = adv_rows.at[:, 1:].set(jnp.mean(adv_rows[:, 1:], axis=2, keepdims=True))
        adv_rows = adv_rows.reshape(-1)
        jax.block_until_ready(adv_rows)
        t_reward = time.perf_counter() - t2
        rows = {
            "gen_tokens": tokens,
            "gen_lengths": lengths,
            "mask": out.mask,
            "ref_logp": ref_logp,
            "adv": adv_rows,
        }
        # on-policy update (no old_logp): it reports the sampler-vs-trainer log-prob gap itself
        rows.update({"old_logp": old_logp} if need_old else {"sampler_logp": out.logps})
        t3 = time.perf_counter()
        m, skipped_now = self.apply_update(state, prompts, rows, valid, shape)
        t_update = time.perf_counter() - t3
        lens = np.asarray(out.lengths)
        n_tok = max(1, int(np.asarray(out.mask).sum()))
        metrics = {
            "reward": float(jnp.mean(total)),
            "reward_std": float(jnp.std(total)),
            "reward_margin": float(jnp.mean(parts["margin"])),
            "reward_margin_std": float(jnp.std(parts["margin"])),
            "reward_ranking": float(jnp.mean(parts["ranking"])),
            "reward_ranking_std": float(jnp.std(parts["ranking"])),
            "zero_variance_groups": float(jnp.mean(zero_var)),
            "summary_len": float(lens.mean()),
            "summary_len_max": int(lens.max()),
            "forced_ret": float(np.mean(out.forced_ret)),
            **(
                {"sampler_vs_trainer_logp": float(np.sum(np.abs(np.asarray(old_logp) - out.logps) * out.mask)) / n_tok}
                if need_old
                else {}
            ),
            "time_rollout_s": t_rollout,
            "time_reforward_s": t_reforward,
            "time_reward_s": t_reward,
            "time_update_s": t_update,
            "tokens_sampled": int(np.asarray(out.mask).sum()),
            "skipped_update": float(skipped_now),
            "skipped_updates": float(state.skipped),
            **{k: float(v) for k, v in m.items()},
        }
        return state, metrics
