"""One Embed-RL step (arXiv 2602.13823): a LoRA reasoner writes T-CoTs, a frozen embedder scores them.

Per step, I pairs (query, positive). The reasoner (policy = base + LoRA, reference = LoRA off) samples
G T-CoT rollouts of each of the 2 I prompts with ELVA's sampler and rollout code (`RLTrainer.rollouts`,
sequences S = 2: the query, then the positive; rows prompt-major [I, 2, G]). Each rollout is decoded,
parsed (`elva_jax.data.tcot`, format flag) and embedded by the frozen embedder, a second model with its
own config, params and tokenizer: the CoT is appended to its side's user turn, then the summarise
request (`tcot_embed_prompt`); the embedding is its final hidden state at ``<emb>``, L2-normalised.
With q [I*G, D] (query rollouts, pair-major) and p [I*G, D] (positive rollouts), ``sims = q p^T`` gives
every rollout's reward (`embed_rl_rewards.batch_rewards`); each prompt's G rollouts form one GRPO group
(``A = group_advantages(R[i, s, :])``), and ELVA's jitted update (`RLTrainer._update_for`, the
teacher-forced GRPO loss of `rl.rollout.rl_loss` with its KL to the LoRA-off reference) moves the LoRA.
The embedder and the reasoner's base never change.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.data.tcot import format_flags
from elva_jax.data.tcot_prompts import PromptFnEncoder, embedder_encoder, reasoner_encoder
from elva_jax.model import backbone
from elva_jax.model.embedding import gather_rows, l2_normalize, last_index_of
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import place, replicated, tree_shardings
from elva_jax.rl import grpo
from elva_jax.rl.embed_rl_rewards import EmbedRLRewardConfig, batch_rewards
from elva_jax.rl.trainer import RLState, RLTrainer, _inputs, encode_prompts

__all__ = ["EmbedRLTrainer", "FrozenEmbedder", "PromptFnEncoder", "reasoner_encoder", "reasoner_policy"]


def embed_rows(params, x: dict, *, cfg, opts, emb_id: int) -> jax.Array:
    """The frozen embedder's program: rows [R, L] (`elva_jax.model.inputs` layout) -> [R, D] fp32, the final
    hidden state at each row's last ``emb_id`` token, L2-normalised (the memory plan compiles this too)."""
    h = backbone.forward(params, x, cfg, opts).hidden
    return l2_normalize(gather_rows(h, jnp.maximum(last_index_of(x["input_ids"], emb_id), 0)))


class FrozenEmbedder:
    """The frozen embedder: ``embed(sides, cots)`` -> [n, D] fp32 L2-normalised, replicated on the mesh.

    Rows: `tcot_embed_prompt(side, cot)` left-padded to the smallest of ``buckets`` that fits (an
    over-long row loses the CoT's tail), embedding = final hidden state at the last ``<emb>``; ``micro_rows``
    rows per model call (0: all; `embed_rl.embedder_micro_rows`). Its params
    are laid out on ``mesh`` by the logical rules of its own config and only ever read.
    """

    def __init__(
        self,
        cfg,
        opts,
        params,
        tokenizer,
        *,
        request: str,
        buckets: tuple[int, ...],
        patch_row_len: int,
        min_pixels: int,
        max_pixels: int,
        mesh=None,
        micro_rows: int = 0,
    ):
        self.cfg, self.opts, self.tokenizer, self.mesh = cfg, opts, tokenizer, mesh
        self.micro_rows = micro_rows
        self.params = params if mesh is None else place(params, tree_shardings(logical_axes(cfg), params, mesh))
        self.buckets, self.row_len = tuple(sorted(buckets)), patch_row_len
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.request = request
        self.emb_id, self.pad_id = tokenizer.emb_token_id, tokenizer.pad_token_id
        rep = {} if mesh is None else {"out_shardings": replicated(mesh)}
        self._embed = jax.jit(functools.partial(embed_rows, cfg=cfg, opts=opts, emb_id=self.emb_id), **rep)

    def encoder(self, cot: str) -> PromptFnEncoder:
        return embedder_encoder(self.tokenizer, self.request, cot)

    def embed(self, sides: list[dict], cots: list[str], put=lambda x: x) -> jax.Array:
        """``put``: places the model inputs on the mesh (rows over the batch axes). The rows go through the
        model ``micro_rows`` at a time (0: all in one call), each call padded to its own bucket."""
        rows = []
        for side, cot in zip(sides, cots, strict=True):
            i, a, pv, g = encode_prompts(
                [side],
                self.encoder(cot),
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                buckets=self.buckets,
                pad_id=self.pad_id,
                geometry=self.cfg.vision.geometry,
            )
            rows.append((i[0], a[0], pv, g))
        step = self.micro_rows or len(rows)
        out = []
        for c in range(0, len(rows), step):
            part = rows[c : c + step]
            P = min(b for b in self.buckets if b >= max(len(r[0]) for r in part))  # each row came in its own bucket
            pad = lambda r, v, P=P: np.concatenate([np.full(P - len(r), v, r.dtype), r])  # noqa: E731
            ids = np.stack([pad(r[0], self.pad_id) for r in part])
            am = np.stack([pad(r[1], 0) for r in part])
            pvs = [x for r in part for x in r[2]]
            grids = [x for r in part for x in r[3]]
            x = _inputs(self.cfg, self.opts, ids, am, pvs, grids, self.row_len)
            out.append(self._embed(self.params, put(x)))
        return out[0] if len(out) == 1 else jnp.concatenate(out)


class EmbedRLTrainer:
    """One Embed-RL step over ELVA's RL machinery: ``policy`` (an `RLTrainer` whose encoder writes the
    reasoner's prompts and whose stop / [RET] ids are both ``<|im_end|>``) samples, re-forwards and
    updates; ``embedder`` scores; ``tokenizer`` decodes the reasoner's tokens.

    ``step(state, instances)`` takes ELVA's instances ({"query", "cands": [positive, ...]}; only the
    positive is used) and returns (state, metrics) with ``reward`` and ``skipped_update`` as `rl.loop`
    expects.
    """

    def __init__(
        self,
        policy: RLTrainer,
        embedder: FrozenEmbedder,
        tokenizer,
        reward_cfg: EmbedRLRewardConfig,
        *,
        format_check: str = "strict",
        key_frame_base: int = 1,
    ):
        if policy.rcfg.candidate_sampling != "per_rollout" or policy.rcfg.aux_soft_rank_weight:
            raise ValueError("Embed-RL needs rl.candidate_sampling=per_rollout and rl.aux_soft_rank_weight=0")
        if reward_cfg.prm_enabled:
            raise NotImplementedError("embed_rl.prm_enabled: the judge model (PRM) is not implemented yet")
        self.policy, self.embedder, self.tokenizer, self.reward_cfg = policy, embedder, tokenizer, reward_cfg
        self.format_check, self.key_frame_base = format_check, key_frame_base
        self.mesh = policy.mesh
        self.last_samples = None  # the last step's samples, texts, embeddings [2*I*G, D] (prompt-major)
        self.last_texts: list[str] = []  # and rewards {"query", "positive"} (pair-major), for inspection
        self.last_embeddings = self.last_rewards = self.last_advantages = None

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Each row's response text: its tokens up to its length, special tokens (the final
        ``<|im_end|>``) dropped."""
        return [self.tokenizer.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(tokens, lengths)]

    def step(self, state: RLState, instances: list[dict], samples=None) -> tuple[RLState, dict]:
        """One step; ``samples``: replay given reasoner samples (host arrays, as ``last_samples``) instead
        of sampling (see `RLTrainer.rollouts`)."""
        pol, rc = self.policy, self.policy.rcfg
        pairs = [{"id": x.get("id"), "query": x["query"], "cands": [x["cands"][0]]} for x in instances]
        t0 = time.perf_counter()
        out, prompts, (I, G, S), chunks = pol.rollouts(state, pairs, samples)
        self.last_samples = out
        t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        # no [RET] embeddings (the embedder scores the text); old log-probs only off-policy (as RLTrainer.step)
        need_old = rc.recompute_old_logp()
        old_logp, ref_logp, _ = pol.reforward(
            state, chunks, out.tokens, out.lengths, G, logps=need_old, embeddings=False
        )
        ref_logp = jnp.zeros(np.shape(out.tokens), jnp.float32) if ref_logp is None else ref_logp
        jax.block_until_ready((old_logp, ref_logp))
        t_reforward = time.perf_counter() - t1
        t2 = time.perf_counter()
        texts = self.decode(np.asarray(out.tokens), np.asarray(out.lengths))  # prompt-major (i, s, g)
        self.last_texts = texts
        flags, reasons = format_flags(texts, check=self.format_check, frame_base=self.key_frame_base)
        sides = [p["query"] if s == 0 else p["cands"][0] for p in pairs for s in range(S) for _ in range(G)]
        emb = self.embedder.embed(sides, texts, put=lambda x: pol._put(x, prompts=True))
        e = emb.reshape(I, S, G, -1)
        q, p = e[:, 0].reshape(I * G, -1), e[:, 1].reshape(I * G, -1)
        sims = q @ p.T  # [I*G, I*G]: query rollout (i, g) vs positive rollout (j, h)
        pair_ids = jnp.repeat(jnp.arange(I), G)
        f = flags.reshape(I, S, G)
        r = batch_rewards(sims, pair_ids, f[:, 0].reshape(-1), f[:, 1].reshape(-1), self.reward_cfg)
        total = jnp.stack([r["query"]["total"].reshape(I, G), r["positive"]["total"].reshape(I, G)], axis=1)
        adv, zero_var = grpo.group_advantages(total, ddof=rc.adv_ddof, eps=rc.adv_eps, scale=rc.adv_scale)
        adv_rows = adv.reshape(-1)  # prompt-major, as the rows
        self.last_embeddings, self.last_rewards, self.last_advantages = emb, r, adv
        jax.block_until_ready(adv_rows)
        t_reward = time.perf_counter() - t2
        valid = np.ones((I, S - 1), bool)
        valid = place(valid, replicated(self.mesh)) if self.mesh is not None else jnp.asarray(valid)
        rows = {
            "gen_tokens": out.tokens,
            "gen_lengths": out.lengths,
            "mask": out.mask,
            "ref_logp": ref_logp,
            "adv": adv_rows,
        }
        # on-policy update (no old_logp): it reports the sampler-vs-trainer log-prob gap itself
        rows.update({"old_logp": old_logp} if need_old else {"sampler_logp": out.logps})
        t3 = time.perf_counter()
        m, skipped_now = pol.apply_update(state, prompts, rows, valid, (I, G, S))
        t_update = time.perf_counter() - t3
        lens = np.asarray(out.lengths)
        mask = np.asarray(out.mask)
        n_tok = max(1, int(mask.sum()))
        both = lambda k: jnp.concatenate([r["query"][k], r["positive"][k]])  # noqa: E731
        metrics = {
            "reward": float(jnp.mean(total)),
            "reward_std": float(jnp.std(total)),
            "reward_query": float(jnp.mean(r["query"]["total"])),
            "reward_positive": float(jnp.mean(r["positive"]["total"])),
            "format": float(np.mean(flags)),
            "orm": float(jnp.mean(both("orm"))),
            "acc": float(jnp.mean(both("acc"))),
            "margin": float(jnp.mean(both("margin"))),
            "zero_variance_groups": float(jnp.mean(zero_var)),
            "cot_len": float(lens.mean()),
            "cot_len_max": int(lens.max()),
            "truncated_cot": float(np.mean(out.forced_ret)),
            **(
                {"sampler_vs_trainer_logp": float(np.sum(np.abs(np.asarray(old_logp) - out.logps) * mask)) / n_tok}
                if need_old
                else {}
            ),
            "time_rollout_s": t_rollout,
            "time_reforward_s": t_reforward,
            "time_reward_s": t_reward,
            "time_update_s": t_update,
            "tokens_sampled": int(mask.sum()),
            "skipped_update": float(skipped_now),
            "skipped_updates": float(state.skipped),
            **{f"format_fail_{k}": float(v) for k, v in sorted(Counter(reasons).items())},
            **{k: float(v) for k, v in m.items()},
        }
        return state, metrics

    @staticmethod
    def log_line(m: dict) -> str:
        """The loop's one-line step summary."""
        return (
            f"reward {m['reward']:.4f} (format {m['format']:.2f}, ORM {m['orm']:.4f}, acc {m['acc']:.2f}) "
            f"kl {m.get('kl_mean', 0.0):.4f} CoT len {m['cot_len']:.1f} | rollout {m['time_rollout_s']:.2f}s "
            f"re-forward {m['time_reforward_s']:.2f}s reward {m['time_reward_s']:.2f}s update "
            f"{m['time_update_s']:.2f}s"
        )


def reasoner_policy(cfg, opts, rcfg, tx, tokenizer, *, request: str, lora_scale: float, **kw) -> RLTrainer:
    """ELVA's `RLTrainer` as the Embed-RL reasoner: the T-CoT generation prompts, sampling stopped at
    ``<|im_end|>`` (which also ends a response that ran out of budget); ``kw`` as for `RLTrainer`."""
    from elva_jax.rl.rewards import RewardConfig

    eos = tokenizer.ids("<|im_end|>")[0]
    return RLTrainer(
        cfg,
        opts,
        rcfg,
        RewardConfig(),  # ELVA's rewards: unused (no auxiliary ranking loss under Embed-RL)
        tx,
        reasoner_encoder(tokenizer, request),
        lora_scale=lora_scale,
        ret_id=eos,
        eos_id=eos,
        pad_id=tokenizer.pad_token_id,
        **kw,
    )
