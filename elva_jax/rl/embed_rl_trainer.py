"""One Embed-RL step (arXiv 2602.13823): a reasoner writes T-CoTs, a frozen embedder (and optionally a
frozen judge) scores them.

Per step, I pairs (query, positive). The reasoner (policy = base + LoRA with reference = LoRA off, or
under full fine-tuning its whole params with reference = a frozen copy of the initial ones) samples
G T-CoT rollouts of each of the 2 I prompts with ELVA's sampler and rollout code (`RLTrainer.rollouts`,
sequences S = 2: the query, then the positive; rows prompt-major [I, 2, G]). Each rollout is decoded,
parsed (`elva_jax.data.tcot`, format flag) and embedded by the frozen embedder, a second model with its
own config, params and tokenizer: the CoT is appended to its side's user turn, then the summarise
request (`tcot_embed_prompt`); the embedding is its final hidden state at ``<emb>``, L2-normalised.
With q [I*G, D] (query rollouts, pair-major) and p [I*G, D] (positive rollouts), ``sims = q p^T`` gives
every rollout's reward (`embed_rl_rewards.batch_rewards`); each prompt's G rollouts form one GRPO group
(``A = group_advantages(R[i, s, :])``), and ELVA's jitted update (`RLTrainer._update_for`, the
teacher-forced GRPO loss of `rl.rollout.rl_loss` with its KL to the reference) moves the LoRA (or the
full params). With the judge (`FrozenJudge`, PRM), every rollout's reasoning is shown with its candidate
list (`embed_rl_rewards.judge_candidates`) and the judge's greedy pick gives PRM = margin if it is one of
the pair's own rollouts. The embedder, the judge and the reference never change.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.data.media.settings import MediaSettings
from elva_jax.data.prompts import prompt_text, tcot_judge_prompt
from elva_jax.data.tcot.encoders import PromptFnEncoder, embedder_encoder, reasoner_encoder
from elva_jax.data.tcot.parser import EVIDENCE_CHECKS, expected_evidence, format_flags
from elva_jax.model import backbone
from elva_jax.model.embedding import gather_rows, l2_normalize, last_index_of
from elva_jax.model.params import logical_axes
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.parallel.sharding import place, replicated, tree_shardings
from elva_jax.rl import grpo
from elva_jax.rl.embed_rl_rewards import (
    ANSWER_PARSE,
    EmbedRLRewardConfig,
    batch_rewards,
    judge_candidates,
    judge_verdicts,
    parse_judge_choice,
)
from elva_jax.rl.rewards import RewardConfig
from elva_jax.rl.trainer import RLState, RLTrainer, encode_prompts, model_inputs

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
    rows per model call (0: all; `embed_rl.embedder_micro_rows`); ``media``: the images' pixel limits and
    patch row (the run's ``data.*``). Its params are laid out on ``mesh`` by the logical rules of its own
    config and only ever read.
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
        media: MediaSettings,
        mesh=None,
        micro_rows: int = 0,
    ):
        self.cfg, self.opts, self.tokenizer, self.mesh = cfg, opts, tokenizer, mesh
        self.micro_rows = micro_rows
        self.params = params if mesh is None else place(params, tree_shardings(logical_axes(cfg), params, mesh))
        self.buckets, self.media, self.row_len = tuple(sorted(buckets)), media, media.patch_row_len
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
                min_pixels=self.media.min_pixels,
                max_pixels=self.media.max_pixels,
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
            x = model_inputs(self.cfg, self.opts, ids, am, pvs, grids, self.row_len)
            out.append(self._embed(self.params, put(x)))
        return out[0] if len(out) == 1 else jnp.concatenate(out)


CANDIDATE_ORDERS = ("own_first", "shuffled")


class FrozenJudge:
    """The PRM judge: a frozen third model (any supported family, own config, params and tokenizer) that
    reads one rollout's reasoning and a numbered list of candidate reasonings (`tcot_judge_prompt`, text
    only, as the official judge) and answers greedily: the shared sampler with ``top_k = 1`` (temperature
    1, so the argmax of the logits; the key is fixed and only matters for exactly tied logits), stopped at
    ``<|im_end|>`` or after ``max_new_tokens``.

    Settings (``embed_rl.prm_*``): ``request`` (the judge's instruction), ``hard_pairs`` (other pairs
    listed), ``answer_parse`` (`parse_judge_choice`), ``candidate_order`` (``"own_first"``: the pair's
    own rollouts, then the hard pairs, as the official code; ``"shuffled"``: one permutation per row,
    drawn from ``(seed, step)`` so a resumed run draws the same ones). Prompts are left-padded to the
    smallest of ``buckets`` that fits; one longer than the largest is not run (no verdict: PRM 0).
    Its params are laid out on ``mesh`` by its own config's logical rules and only ever read.
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
        max_new_tokens: int = 10,
        hard_pairs: int = 4,
        answer_parse: str = "strict",
        candidate_order: str = "own_first",
        patch_row_len: int = 64,
        seed: int = 0,
        rows_per_call: int = 0,
        mesh=None,
    ):
        if rows_per_call < 0:
            raise ValueError(f"rows_per_call must be >= 0 (0: all rows in one call), got {rows_per_call}")
        self.rows_per_call = rows_per_call
        if answer_parse not in ANSWER_PARSE:
            raise ValueError(f"answer_parse must be one of {list(ANSWER_PARSE)}, got {answer_parse!r}")
        if candidate_order not in CANDIDATE_ORDERS:
            raise ValueError(f"candidate_order must be one of {list(CANDIDATE_ORDERS)}, got {candidate_order!r}")
        if hard_pairs < 1 or max_new_tokens < 1:
            raise ValueError(f"hard_pairs and max_new_tokens must be >= 1, got {hard_pairs}, {max_new_tokens}")
        self.cfg, self.opts, self.tokenizer, self.mesh = cfg, opts, tokenizer, mesh
        self.params = params if mesh is None else place(params, tree_shardings(logical_axes(cfg), params, mesh))
        self.request, self.buckets, self.row_len = request, tuple(sorted(buckets)), patch_row_len
        self.hard_pairs, self.answer_parse, self.candidate_order, self.seed = (
            hard_pairs,
            answer_parse,
            candidate_order,
            seed,
        )
        self.pad_id = tokenizer.pad_token_id
        eos = tokenizer.im_end_token_id
        self.scfg = SamplerConfig(
            max_new_tokens=max_new_tokens, temperature=1.0, top_k=1, top_p=1.0, cache_dtype=opts.dtype, mesh=mesh
        )
        rep = {} if mesh is None else {"out_shardings": replicated(mesh)}
        gen = dict(num_samples=1, stop_ids=(eos,), ret_id=eos, pad_id=self.pad_id)
        self._gen = jax.jit(lambda p, x: generate(p, x, jax.random.key(0), cfg, opts, self.scfg, **gen), **rep)

    def answer(self, prompts: list, put=lambda x: x) -> tuple[list[str | None], np.ndarray]:
        """Each prompt's greedy answer (special tokens dropped; None where the prompt is longer than the
        largest bucket) and the over-long flags [n]. Rows run ``rows_per_call`` at a time (0: all in one
        call; the last call is padded with copies of its first row, so every call has the same shape)."""
        rows = [np.asarray(self.tokenizer.encode_prompt(p)["input_ids"], np.int32) for p in prompts]
        overlong = np.array([len(r) > self.buckets[-1] for r in rows])
        P = min(b for b in self.buckets if b >= min(max(len(r) for r in rows), self.buckets[-1]))
        n = self.rows_per_call or len(rows)
        texts: list[str] = []
        for c in range(0, len(rows), n):
            part = rows[c : c + n]
            part = part + [part[0]] * (n - len(part))
            ids = np.full((n, P), self.pad_id, np.int32)
            am = np.zeros_like(ids)
            for i, r in enumerate(part):
                r = r[:P]  # an over-long row runs on its head (static shapes); its answer is discarded
                ids[i, P - len(r) :], am[i, P - len(r) :] = r, 1
            x = model_inputs(self.cfg, self.opts, ids, am, [None] * n, [None] * n, self.row_len)
            out = self._gen(self.params, put(x))
            toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
            texts += [self.tokenizer.decode(t[:k].tolist(), skip_special_tokens=True) for t, k in zip(toks, lens)]
        return [None if o else t for t, o in zip(texts[: len(rows)], overlong)], overlong

    def verdicts(self, sims, sides, texts, I: int, G: int, step: int, put=lambda x: x) -> tuple[dict, dict]:
        """The judge's verdict on every rollout of a step: ``({"query": [I*G], "positive": [I*G]} bool,
        metrics)``.

        ``sims`` [I*G, I*G] (query rollout (i, g) x positive rollout (j, h), pair-major); ``sides[i]`` =
        (query side, positive side); ``texts`` prompt-major (i, s, g). A query row lists its own pair's G
        positive rollouts and, from each of the ``hard_pairs`` other pairs most similar to it, that pair's
        most similar positive rollout (`judge_candidates`); a positive row the same over query rollouts.
        A row with no other pair (I = 1) is not judged (official). Correct = the pick is an own rollout."""
        S = 2
        pair_ids = np.repeat(np.arange(I), G)
        rng = np.random.default_rng([self.seed, step, 0x9D6E])
        s = np.asarray(sims)
        prompts, listed_own, n_listed, judged = [], [], [], []
        for side, mat in ((0, s), (1, s.T)):
            cols, own, valid = (
                np.asarray(a)
                for a in judge_candidates(mat, pair_ids, pair_ids, num_pairs=I, hard_pairs=self.hard_pairs, num_own=G)
            )
            for r in range(I * G):
                i, g = divmod(r, G)
                idx = np.flatnonzero(valid[r])
                if self.candidate_order == "shuffled":
                    idx = rng.permutation(idx)
                lo = np.zeros(cols.shape[1], bool)
                lo[: len(idx)] = own[r, idx]
                listed_own.append(lo)
                n_listed.append(len(idx))
                judged.append(bool(valid[r, G:].any()))
                me = sides[i][side]
                query = prompt_text(me.get("text"), me.get("instruction")) or "(an image)"
                cands = [texts[((int(c) // G) * S + 1 - side) * G + int(c) % G] for c in cols[r, idx]]
                prompts.append(tcot_judge_prompt(query, texts[(i * S + side) * G + g], cands, request=self.request))
        judged = np.asarray(judged)
        run = np.flatnonzero(judged)
        answers: list = [None] * len(prompts)
        overlong = np.zeros(len(prompts), bool)
        if len(run):
            got, ol = self.answer([prompts[k] for k in run], put)
            for k, a, o in zip(run, got, ol):
                answers[k], overlong[k] = a, o
        choice = np.array(
            [-1 if a is None else parse_judge_choice(a, k, self.answer_parse) for a, k in zip(answers, n_listed)]
        )
        correct = np.asarray(judge_verdicts(choice, np.asarray(listed_own))) & judged
        unparsable = judged & ~overlong & (choice < 0)
        n = max(1, int(judged.sum()))
        m = {
            "prm_judged": float(judged.mean()),
            "prm_acc": float(correct.sum()) / n,
            "prm_unparsable": float(unparsable.sum()) / n,
            "prm_overlong": float((judged & overlong).sum()) / n,
        }
        self.last_prompts, self.last_answers, self.last_choice = prompts, answers, choice
        return {"query": correct[: I * G], "positive": correct[I * G :]}, m


def _pairs(instances: list[dict]) -> list[dict]:
    """ELVA's RL instances as Embed-RL pairs: the query and its positive (the first candidate) only."""
    return [{"id": x.get("id"), "query": x["query"], "cands": [x["cands"][0]]} for x in instances]


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
        judge: FrozenJudge | None = None,
        evidence_kind: str = "modality",
    ):
        if policy.rcfg.candidate_sampling != "per_rollout" or policy.rcfg.aux_soft_rank_weight:
            raise ValueError("Embed-RL needs rl.candidate_sampling=per_rollout and rl.aux_soft_rank_weight=0")
        if reward_cfg.prm_enabled != (judge is not None):
            raise ValueError("embed_rl.prm_enabled needs a judge (FrozenJudge), and a judge needs prm_enabled")
        self.policy, self.embedder, self.tokenizer, self.reward_cfg = policy, embedder, tokenizer, reward_cfg
        self.judge = judge
        if evidence_kind not in EVIDENCE_CHECKS:
            raise ValueError(f"evidence_kind must be one of {list(EVIDENCE_CHECKS)}, got {evidence_kind!r}")
        self.evidence_kind = evidence_kind  # strict check: "modality" = the side's kind (`expected_evidence`)
        self.format_check, self.key_frame_base = format_check, key_frame_base
        self.mesh = policy.mesh
        self.last_samples = None  # the last step's samples, texts, embeddings [2*I*G, D] (prompt-major)
        self.last_texts: list[str] = []  # and rewards {"query", "positive"} (pair-major), for inspection
        self.last_embeddings = self.last_rewards = self.last_advantages = None

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Each row's response text: its tokens up to its length, special tokens (the final
        ``<|im_end|>``) dropped."""
        return [self.tokenizer.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(tokens, lengths)]

    def score(self, pairs: list[dict], out, shape: tuple[int, int, int], step: int) -> tuple:
        """Every rollout of ``out`` (prompt-major (i, s, g) rows of ``pairs``) decoded, format-checked,
        embedded and rewarded: (texts [2IG], flags [2IG], failure reasons, embeddings [2IG, D], rewards
        {"query", "positive"} pair-major [IG] each, judge metrics). ``sims = q p^T`` [IG, IG]; ``step``
        seeds the judge's shuffled candidate order."""
        I, G, S = shape
        put = lambda x: self.policy._put(x, prompts=True)  # noqa: E731
        texts = self.decode(np.asarray(out.tokens), np.asarray(out.lengths))  # prompt-major (i, s, g)
        sides = [p["query"] if s == 0 else p["cands"][0] for p in pairs for s in range(S) for _ in range(G)]
        want = [expected_evidence(x) for x in sides] if self.evidence_kind == "modality" else None
        flags, reasons = format_flags(texts, check=self.format_check, expected=want, frame_base=self.key_frame_base)
        emb = self.embedder.embed(sides, texts, put=put)
        e = emb.reshape(I, S, G, -1)
        q, p = e[:, 0].reshape(I * G, -1), e[:, 1].reshape(I * G, -1)
        sims = q @ p.T  # [I*G, I*G]: query rollout (i, g) vs positive rollout (j, h)
        f = flags.reshape(I, S, G)
        verdict, judge_m = {"query": None, "positive": None}, {}
        if self.judge is not None:
            t_j = time.perf_counter()
            side_pairs = [(p["query"], p["cands"][0]) for p in pairs]
            verdict, judge_m = self.judge.verdicts(sims, side_pairs, texts, I, G, step, put=put)
            judge_m["time_judge_s"] = time.perf_counter() - t_j
        r = batch_rewards(
            sims,
            jnp.repeat(jnp.arange(I), G),
            f[:, 0].reshape(-1),
            f[:, 1].reshape(-1),
            self.reward_cfg,
            judge_query=verdict["query"],
            judge_positive=verdict["positive"],
        )
        return texts, flags, reasons, emb, r, judge_m

    def probe(self, state: RLState, instances, key: jax.Array, chunk: int) -> dict:
        """The reasoner's scores on fixed held-out pairs (no update; ``state`` is left as it is): each chunk
        of ``chunk`` pairs (the step's ``instances_per_step``, so the other pairs of the chunk are the
        in-batch negatives, as in a step) samples G rollouts per prompt with ``fold_in(key, c)`` (chunk
        offset c: the same draws at every call for the same policy) and is scored as a step scores its
        batch (`score`). Returns the means over all rollouts of both sides: ``probe_reward`` (R),
        ``probe_format`` (format-valid rate), ``probe_orm``, ``probe_acc``, ``probe_margin`` and
        ``probe_prm``."""
        sums = dict.fromkeys(("reward", "format", "orm", "acc", "margin", "prm"), 0.0)
        n = 0
        for c in range(0, len(instances), chunk):
            part = [instances[i] for i in range(c, min(c + chunk, len(instances)))]
            pairs = _pairs(part)
            st = dataclasses.replace(state, key=jax.random.fold_in(key, c))
            out, _, shape, _ = self.policy.rollouts(st, pairs)
            _, flags, _, _, r, _ = self.score(pairs, out, shape, 0)
            sums["format"] += float(np.sum(flags))
            for k, name in (("total", "reward"), ("orm", "orm"), ("acc", "acc"), ("margin", "margin"), ("prm", "prm")):
                sums[name] += float(np.sum(r["query"][k]) + np.sum(r["positive"][k]))
            n += len(flags)
        return {f"probe_{k}": v / n for k, v in sums.items()}

    @staticmethod
    def probe_line(p: dict) -> str:
        """The loop's one-line probe summary."""
        return (
            f"reward {p['probe_reward']:.4f} (format {p['probe_format']:.3f}, ORM {p['probe_orm']:.4f}, acc "
            f"{p['probe_acc']:.3f}, margin {p['probe_margin']:.4f})"
        )

    def step(self, state: RLState, instances: list[dict], samples=None) -> tuple[RLState, dict]:
        """One step; ``samples``: replay given reasoner samples (host arrays, as ``last_samples``) instead
        of sampling (see `RLTrainer.rollouts`)."""
        pol, rc = self.policy, self.policy.rcfg
        pairs = _pairs(instances)
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
        texts, flags, reasons, emb, r, judge_m = self.score(pairs, out, (I, G, S), state.step)
        self.last_texts = texts
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
            "prm": float(jnp.mean(both("prm"))),
            **judge_m,
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
            f"reward {m['reward']:.4f} (format {m['format']:.2f}, ORM {m['orm']:.4f}, acc {m['acc']:.2f}"
            + (f", PRM {m['prm']:.4f}, judge acc {m['prm_acc']:.2f}" if "prm_acc" in m else "")
            + ") "
            f"kl {m.get('kl_mean', 0.0):.4f} CoT len {m['cot_len']:.1f} | rollout {m['time_rollout_s']:.2f}s "
            f"re-forward {m['time_reforward_s']:.2f}s reward {m['time_reward_s']:.2f}s update "
            f"{m['time_update_s']:.2f}s"
        )


def reasoner_policy(cfg, opts, rcfg, tx, tokenizer, *, request: str, lora_scale: float, **kw) -> RLTrainer:
    """ELVA's `RLTrainer` as the Embed-RL reasoner: the T-CoT generation prompts, sampling stopped at
    ``<|im_end|>`` (which also ends a response that ran out of budget), no [RET] embeddings; ``kw`` as
    for `RLTrainer` (``full_finetune=True``: the reasoner's whole params train against a frozen copy)."""
    eos = tokenizer.im_end_token_id
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
        sample_embeddings=False,  # the embedder scores the text: no [RET] embeddings from the sampler
        **kw,
    )
