"""W4's PyTorch reference: the ELVA RL step as a PyTorch user writes it with transformers, peft and TRL.

Same workload as `elva_jax.rl.trainer.RLTrainer.step` (the prompts come from elva_jax's own prompt
encoder, so both sides see the same token ids and pixels), phase by phase:

* rollout: transformers' ``generate`` with the LoRA active (sampling, temperature T, no top-k /
  top-p, ``num_return_sequences = G``, stop on ``[RET]`` or ``<|im_end|>``, at most ``budget`` new
  tokens); then elva_jax's convention: an ``<|im_end|>`` becomes ``[RET]`` (not sampled, masked out),
  a summary that ran out of budget gets ``[RET]`` appended. Rows are prompt-major ``[S * G, T]``
  with ``T = budget + 1``.
* re-forward (no gradient): a teacher-forced forward of every row (prompt + summary + ``[RET]``,
  no prefix sharing, as TRL does) gives the policy log-probs (TRL's ``selective_log_softmax`` of
  ``logits / T``) and the ``[RET]`` embeddings (final-norm hidden state at ``[RET]``, L2-normalised);
  with ``beta > 0`` the reference log-probs come from the same forward with the adapter disabled.
* reward: the ELVA margin + ranking rewards (`torch_rewards`, from the formulas of
  `elva_jax.rl.rewards`, ranks by a stable sort) and group-relative advantages.
* update: TRL's GRPO loss (`trl_grpo_loss`, TRL's ``GRPOTrainer._compute_loss`` for
  ``loss_type`` grpo / bnpo / dr_grpo, transcribed: it is a trainer method, not callable alone),
  with ``old = logp.detach()`` (mu = 1), backward over row chunks (gradient accumulation) and one
  AdamW step of the LoRA parameters.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# rewards and loss (pure torch)
# --------------------------------------------------------------------------------------------
def stable_ranks(sims: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based positions in a stable descending sort of the valid candidates; [..., C] -> int [..., C]
    (padded entries sort last and get ranks no reward reads)."""
    s = torch.where(valid, sims, torch.full_like(sims, -math.inf))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def torch_rewards(sims: torch.Tensor, valid: torch.Tensor, rcfg) -> tuple[torch.Tensor, dict]:
    """ELVA's reward over [..., C] similarities (index 0 the positive); rcfg: elva_jax RewardConfig.

    R_rank = s_pos / (1 + log r) - gamma * sum_{valid k} s_k (log r_k - 1) and
    R_margin = max(0, s_pos - max_{valid k} s_k - delta) (hardest = 0 without a valid negative),
    R = alpha R_margin + epsilon R_rank, log in base rcfg.log_base."""
    sims = sims.double()
    valid = valid.clone()
    valid[..., 0] = True
    r = stable_ranks(sims, valid).double()
    logr = torch.log(r) / math.log(rcfg.log_base)
    vn = valid[..., 1:]
    neg = torch.where(vn, sims[..., 1:] * (logr[..., 1:] - 1.0), torch.zeros_like(sims[..., 1:])).sum(-1)
    ranking = sims[..., 0] / (1.0 + logr[..., 0]) - rcfg.gamma * neg
    if sims.shape[-1] > 1:
        hardest = torch.where(vn, sims[..., 1:], torch.full_like(sims[..., 1:], -math.inf)).amax(-1)
        hardest = torch.where(vn.any(-1), hardest, torch.zeros_like(hardest))
    else:
        hardest = torch.zeros_like(sims[..., 0])
    margin = torch.clamp(sims[..., 0] - hardest - rcfg.delta, min=0.0)
    return rcfg.alpha * margin + rcfg.epsilon * ranking, {"margin": margin, "ranking": ranking}


def group_advantages(rewards: torch.Tensor, *, ddof: int, eps: float) -> torch.Tensor:
    """(r - mean) / (std + eps) over the last axis (std with ``ddof``; TRL uses torch.std, ddof 1);
    exactly 0 for a group whose rewards are all equal."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, correction=ddof)
    adv = centered / (std + eps)
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(adv), adv)


def trl_grpo_loss(logp, old_logp, ref_logp, adv, mask, *, eps_low, eps_high, beta, loss_type, n_rows=None):
    """TRL's GRPO loss (``GRPOTrainer._compute_loss``, token-level importance sampling):

    coef_1 = exp(logp - old), coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high),
    l_t = -min(coef_1 A, coef_2 A) + beta (exp(ref - logp) - (ref - logp) - 1);
    grpo: mean over rows of each row's masked token mean; bnpo: masked token mean;
    dr_grpo: masked sum / (rows * T). ``n_rows``: the whole batch's row count when this is a chunk
    of it (the chunk's share of the full-batch loss; for bnpo pass the full batch instead).
    Returns (loss, per-token KL [N, T] or None)."""
    mask = mask.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = None
    if beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    n = logp.shape[0] if n_rows is None else n_rows
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n * logp.shape[1])
    else:
        raise ValueError(f"loss_type {loss_type!r}: the reference implements grpo, bnpo and dr_grpo")
    return loss, kl


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def hf_config(model_cfg):
    """transformers' config of an elva_jax ModelConfig (its config.json content, the family's auto class)."""
    import transformers

    return transformers.AutoConfig.for_model(**dict(model_cfg.raw))


def lora_model(model, *, rank: int, alpha: float, targets):
    """peft LoRA on the language model's linear layers named ``targets`` (vision tower frozen, untouched)."""
    import peft

    pattern = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + r")$"
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none")
    return peft.get_peft_model(model, cfg)


def load_jax_lora(pmodel, lora: dict) -> None:
    """Copy elva_jax adapters (A [L, in, r], B [L, r, out]: y = x W + s x A B) into peft's
    (lora_A.weight [r, in], lora_B.weight [out, r])."""
    done = 0
    with torch.no_grad():
        for name, mod in pmodel.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in lora and hasattr(mod, "lora_A") and ".language_model.layers." in name:
                layer = int(name.split(".language_model.layers.")[1].split(".")[0])
                a, b = (np.asarray(lora[leaf][k][layer], np.float32) for k in ("a", "b"))
                mod.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
                done += 1
    want = sum(int(np.shape(v["a"])[0]) for v in lora.values())
    if done != want:
        raise ValueError(f"copied {done} LoRA adapters into the peft model, elva_jax has {want}")


class TorchRLStep:
    """The RL step of the module docstring on a peft-wrapped transformers Qwen2-VL.

    rcfg / reward_cfg: elva_jax's RLConfig / RewardConfig (the same fields drive both sides).
    row_chunk: rows per teacher-forced forward / backward (gradient accumulation; exact).
    """

    def __init__(self, pmodel, rcfg, reward_cfg, *, lr, weight_decay, ret_id, eos_id, pad_id, row_chunk=72):
        self.m, self.rcfg, self.reward_cfg = pmodel, rcfg, reward_cfg
        self.ret_id, self.eos_id, self.pad_id, self.row_chunk = ret_id, eos_id, pad_id, row_chunk
        params = [p for p in pmodel.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self.inner = pmodel.base_model.model  # the transformers model (LoRA layers injected)
        self.image_token_id = self.inner.config.image_token_id

    # ---- rollout ----------------------------------------------------------------------------
    def _prompt_inputs(self, ids, am, pvs, grids):
        kw = {"input_ids": torch.as_tensor(ids, dtype=torch.long), "attention_mask": torch.as_tensor(am)}
        kw["attention_mask"] = kw["attention_mask"].long()
        with_img = [i for i, p in enumerate(pvs) if p is not None]
        if with_img:
            kw["pixel_values"] = torch.from_numpy(np.concatenate([pvs[i] for i in with_img]).astype(np.float32))
            kw["image_grid_thw"] = torch.from_numpy(np.concatenate([grids[i] for i in with_img]).astype(np.int64))
            kw["mm_token_type_ids"] = (kw["input_ids"] == self.image_token_id).long()
        return kw

    @torch.no_grad()
    def rollout(self, ids, am, pvs, grids, G: int, generator_seed: int | None = None) -> dict:
        """Prompt-major samples in elva_jax's convention: tokens / mask [S*G, T], lengths, forced_ret."""
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        rc = self.rcfg
        budget, T = rc.max_summary_tokens, rc.max_summary_tokens + 1
        out = self.m.generate(
            **self._prompt_inputs(ids, am, pvs, grids),
            do_sample=True,
            temperature=rc.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=budget,
            num_return_sequences=G,
            eos_token_id=[self.ret_id, self.eos_id],
            pad_token_id=self.pad_id,
        )
        new = out[:, ids.shape[1] :].cpu().numpy()
        N, n_new = new.shape
        toks = np.full((N, T), self.pad_id, np.int64)
        mask = np.zeros((N, T), bool)
        lengths = np.zeros(N, np.int64)
        forced = np.zeros(N, bool)
        for r in range(N):
            stop = np.flatnonzero(np.isin(new[r], (self.ret_id, self.eos_id)))
            k = int(stop[0]) if len(stop) else n_new
            toks[r, :k] = new[r, :k]
            mask[r, :k] = True
            if len(stop) and new[r, k] == self.ret_id:  # a sampled [RET] is a sampled token
                mask[r, k] = True
            forced[r] = not len(stop)
            toks[r, k] = self.ret_id
            lengths[r] = k + 1
        return {"tokens": toks, "mask": mask, "lengths": lengths, "forced_ret": forced}

    # ---- teacher-forced pass ----------------------------------------------------------------
    def _row_inputs(self, ids, am, pvs, grids, G, toks, lengths, rows):
        P, T = ids.shape[1], toks.shape[1]
        pr = rows // G  # prompt-major: row r continues prompt r // G
        gen_am = (np.arange(T)[None] < lengths[rows][:, None]).astype(np.int64)
        full = np.concatenate([ids[pr], toks[rows]], 1)
        fam = np.concatenate([am[pr], gen_am], 1)
        kw = self._prompt_inputs(full, fam, [pvs[p] for p in pr], [grids[p] for p in pr])
        return kw, P, T

    def forward_rows(self, ids, am, pvs, grids, G, toks, lengths, rows, *, adapter: bool = True):
        """(log-probs [n, T] of toks[rows] at temperature rc.temperature, [RET] embeddings [n, D])."""
        from trl.trainer.utils import selective_log_softmax

        kw, P, T = self._row_inputs(ids, am, pvs, grids, G, toks, lengths, rows)

        def run():
            h = self.inner.model(**kw).last_hidden_state  # after the final norm
            logits = self.inner.lm_head(h[:, P - 1 : P + T - 1]) / self.rcfg.temperature
            logp = selective_log_softmax(logits, torch.as_tensor(toks[rows]))
            ret = torch.as_tensor(P + lengths[rows] - 1)
            emb = F.normalize(h[torch.arange(len(rows)), ret], dim=-1)
            return logp, emb

        if adapter:
            return run()
        with self.m.disable_adapter():
            return run()

    def _chunks(self, N):
        c = self.row_chunk or N
        return [np.arange(i, min(i + c, N)) for i in range(0, N, c)]

    # ---- the step ---------------------------------------------------------------------------
    def step(self, ids, am, pvs, grids, I: int, valid=None, samples: dict | None = None) -> dict:
        """One RL step over I instances of S prompts each (prompt rows instance-major); metrics and
        per-phase times. ``samples`` (as `rollout` returns): replay them instead of sampling."""
        rc, G = self.rcfg, self.rcfg.group_size
        S = len(ids) // I
        t0 = time.perf_counter()
        smp = samples if samples is not None else self.rollout(ids, am, pvs, grids, G)
        toks, lengths = smp["tokens"], smp["lengths"]
        mask = torch.as_tensor(smp["mask"])
        N = len(toks)
        t1 = time.perf_counter()
        self.m.eval()
        with torch.no_grad():
            olds, refs, embs = [], [], []
            for rows in self._chunks(N):
                lp, e = self.forward_rows(ids, am, pvs, grids, G, toks, lengths, rows)
                olds.append(lp)
                embs.append(e)
                if rc.beta:
                    refs.append(self.forward_rows(ids, am, pvs, grids, G, toks, lengths, rows, adapter=False)[0])
            old = torch.cat(olds)
            ref = torch.cat(refs) if refs else None
            emb = torch.cat(embs)
        t2 = time.perf_counter()
        e = emb.reshape(I, S, G, -1)
        sims = torch.einsum("igd,icgd->igc", e[:, 0], e[:, 1:])  # [I, G, C]
        v = torch.ones(I, S - 1, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
        total, parts = torch_rewards(sims, v[:, None, :].expand(I, G, S - 1), self.reward_cfg)
        adv = group_advantages(total, ddof=rc.adv_ddof, eps=rc.adv_eps)  # [I, G]
        adv_rows = adv[:, None, :].expand(I, S, G).reshape(-1).float()  # prompt-major
        t3 = time.perf_counter()
        self.m.train()
        self.opt.zero_grad(set_to_none=True)
        loss_total, kl_sum = 0.0, 0.0
        for rows in self._chunks(N):
            logp, _ = self.forward_rows(ids, am, pvs, grids, G, toks, lengths, rows)
            r = torch.as_tensor(rows)
            loss, kl = trl_grpo_loss(
                logp,
                logp.detach(),  # mu = 1: TRL reuses the current log-probs, detached
                None if ref is None else ref[r],
                adv_rows[r],
                mask[r],
                eps_low=rc.eps_low,
                eps_high=rc.eps_high,
                beta=rc.beta,
                loss_type=rc.loss_type,
                n_rows=N,
            )
            loss.backward()
            loss_total += float(loss.detach())
            if kl is not None:
                kl_sum += float((kl.detach() * mask[r]).sum())
        self.opt.step()
        t4 = time.perf_counter()
        n_tok = max(1, int(mask.sum()))
        return {
            "reward": float(total.mean()),
            "reward_std": float(total.std(correction=0)),
            "reward_margin": float(parts["margin"].mean()),
            "reward_ranking": float(parts["ranking"].mean()),
            "loss": loss_total,
            "kl_mean": kl_sum / n_tok,
            "tokens_sampled": int(mask.sum()),
            "summary_len": float(np.mean(lengths)),
            "time_rollout_s": t1 - t0,
            "time_reforward_s": t2 - t1,
            "time_reward_s": t3 - t2,
            "time_update_s": t4 - t3,
            "old_logp": old,
            "emb": emb,
        }
