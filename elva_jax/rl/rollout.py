"""Rollouts of the ELVA stage: teacher-forced re-forward, rewards and the GRPO update.

Layout. An RL batch holds I instances (query + C candidates: positive first), each with G rollouts.
Every rollout has one sampled summary per sequence: S = 1 + C sequences (the query, then the
candidates), so N = I * G * S rows, ordered [instance, rollout, sequence]. Each row is its left-padded
prompt (length P) followed by T generated slots (summary tokens, [RET], then padding).

One forward over prompt + summary + [RET] gives both the per-token log-probs of the summary tokens
(log_softmax(logits / temperature), the sampler's distribution) and the [RET] embedding. The reference
policy is the same base params with `lora=None`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elva_jax.model import backbone
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.embedding import l2_normalize
from elva_jax.model.sampler import repeat_rows
from elva_jax.rl import grpo
from elva_jax.rl.rewards import RewardConfig, reward_from_config, soft_ranking_loss
from elva_jax.schema.rl import RLConfig


def token_logps(
    params,
    hidden_pred: jnp.ndarray,
    targets: jnp.ndarray,
    cfg: ModelConfig,
    opts: ModelOptions,
    temperature: float,
    chunk: int,
) -> jnp.ndarray:
    """log_softmax(lm_head(h) / T)[target] for h [N, T, D] predicting targets [N, T]; rows in chunks."""
    N = hidden_pred.shape[0]
    chunk = max(1, min(chunk, N))
    pad = (-N) % chunk
    h = jnp.pad(hidden_pred, ((0, pad), (0, 0), (0, 0)))
    t = jnp.pad(targets, ((0, pad), (0, 0)))

    if opts.vocab:  # the generation vocabulary's K logits only (the others are -1e9: no share of the sum)
        where = (
            jnp.full((cfg.text.vocab_size,), -1, jnp.int32)
            .at[jnp.asarray(opts.vocab)]
            .set(jnp.arange(len(opts.vocab), dtype=jnp.int32))
        )

    def one(xs):
        hc, tc = xs
        if opts.vocab:
            logits = backbone.vocab_logits(params, hc, cfg, opts) / temperature
            k = where[tc]
            picked = jnp.where(k >= 0, jnp.take_along_axis(logits, jnp.maximum(k, 0)[..., None], axis=-1)[..., 0], -1e9)
            return picked - jax.nn.logsumexp(logits, axis=-1)
        logits = backbone.lm_head(params, hc, cfg, opts) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse

    # rematerialised: the backward pass recomputes each chunk's logits instead of keeping all of them
    # (full-vocabulary fp32 logits for every generated token dominated the RL update's memory)
    out = jax.lax.map(jax.checkpoint(one), (h.reshape(-1, chunk, *h.shape[1:]), t.reshape(-1, chunk, t.shape[1])))
    return out.reshape(-1, targets.shape[1])[:N]


def teacher_forced(
    params,
    lora,
    lora_scale,
    inputs: dict,
    gen_tokens,
    gen_lengths,
    prompt_len: int,
    cfg: ModelConfig,
    opts: ModelOptions,
    rcfg: RLConfig,
):
    """(per-token log-probs [N, T] of the generated tokens, [RET] embeddings [N, D] L2-normalised).

    inputs: model inputs over prompt + generated slots [N, P + T]; gen_tokens [N, T]; gen_lengths [N]
    (tokens up to and including [RET]).
    """
    h = backbone.forward(params, inputs, cfg, opts, lora=lora, lora_scale=lora_scale).hidden
    T = gen_tokens.shape[1]
    pred = jax.lax.dynamic_slice_in_dim(h, prompt_len - 1, T, axis=1)  # h[t] predicts token t+1
    logps = token_logps(params, pred, gen_tokens, cfg, opts, rcfg.temperature, rcfg.logp_chunk)
    ret_pos = prompt_len + gen_lengths - 1
    emb = l2_normalize(jnp.take_along_axis(h, ret_pos[:, None, None], axis=1)[:, 0])
    return logps, emb


def teacher_forced_shared(
    params,
    lora,
    lora_scale,
    prompts: dict,
    gen_tokens,
    gen_lengths,
    num_samples: int,
    cfg: ModelConfig,
    opts: ModelOptions,
    rcfg: RLConfig,
    with_logps: bool = True,
):
    """`teacher_forced` with prefix sharing: each of the D distinct prompts [D, P] is encoded once and its
    KV cache broadcast to its G samples (rows prompt-major: d*G .. d*G+G-1 of gen_tokens [D*G, T]).

    Same values and gradients as running every full sequence (the broadcast is differentiable, so the
    prompt's share of the gradient is summed over its samples), at 1/G of the prompt compute.
    ``with_logps=False``: the embeddings only (log-probs None; no LM head over the vocabulary).
    """
    D, P = prompts["input_ids"].shape
    T = gen_tokens.shape[1]
    cache = backbone.init_cache(cfg, D, P + T, dtype=jnp.dtype(opts.dtype))
    out, cache = backbone.prefill(params, prompts, cache, cfg, opts, lora=lora, lora_scale=lora_scale, logits="none")
    cache = repeat_rows(cache, num_samples)
    h = backbone.extend(params, gen_tokens, gen_lengths, cache, cfg, opts, lora=lora, lora_scale=lora_scale)
    emb = l2_normalize(jnp.take_along_axis(h, (gen_lengths - 1)[:, None, None], axis=1)[:, 0])
    if not with_logps:
        return None, emb
    pred = jnp.concatenate([jnp.repeat(out.hidden[:, -1:], num_samples, axis=0), h[:, :-1]], axis=1)
    logps = token_logps(params, pred, gen_tokens, cfg, opts, rcfg.temperature, rcfg.logp_chunk)
    return logps, emb


def rollout_similarities(emb: jnp.ndarray, I: int, G: int, S: int) -> jnp.ndarray:
    """[N, D] embeddings ordered [instance, rollout, sequence] -> sims [I, G, C] = cos(query, candidate)."""
    e = emb.reshape(I, G, S, -1)
    return jnp.einsum("igd,igcd->igc", e[:, :, 0], e[:, :, 1:])


def rewards_and_advantages(sims, valid, rcfg: RLConfig, reward_cfg: RewardConfig):
    """Rewards [I, G] (+ parts) and group-relative advantages [I, G] with the zero-variance mask [I]."""
    total, parts = reward_from_config(sims, reward_cfg, valid)
    adv, zero_var = grpo.group_advantages(total, ddof=rcfg.adv_ddof, eps=rcfg.adv_eps, scale=rcfg.adv_scale)
    return total, parts, adv, zero_var


def prompt_major_to_rollouts(x: jnp.ndarray, I: int, G: int, S: int) -> jnp.ndarray:
    """Rows ordered [instance, sequence, sample] -> [instance, rollout, sequence] (flattened)."""
    return x.reshape(I, S, G, *x.shape[1:]).swapaxes(1, 2).reshape(I * G * S, *x.shape[1:])


def rl_loss(
    lora,
    params,
    batch: dict,
    *,
    cfg,
    opts,
    rcfg: RLConfig,
    reward_cfg: RewardConfig,
    lora_scale: float,
    shape: tuple[int, int, int],
    denominator=None,
    aux_fraction: float = 1.0,
    full_finetune: bool = False,
):
    """GRPO loss (+ optional auxiliary soft-ranking loss) and metrics for one batch of rollouts.

    ``full_finetune``: ``lora`` is the policy's whole param tree (the differentiated argument), run with
    no adapter; ``params`` (the frozen reference) is then unused here (its log-probs are ``ref_logp``).

    For a micro-batch of a larger batch: ``denominator`` is the whole batch's GRPO denominator
    (``grpo.aggregate``), so the GRPO term is this micro-batch's loss sum over it, and the
    auxiliary term is weighted by ``aux_fraction`` (this micro-batch's share of the instances);
    the micro-batch losses then sum to the whole batch's loss exactly.

    Rows are prompt-major: the D = I * S distinct prompts (`prompts`, [D, P]) each with G samples
    (gen_tokens, gen_lengths, mask, old_logp, ref_logp: [D * G, ...]); adv [D * G] is the
    advantage of the rollout each row belongs to; valid [I, C]. The forward shares each prompt's
    prefill across its G samples (`teacher_forced_shared`).

    Without ``old_logp`` the update is on-policy: old log-probs = stop_gradient(logp) (mu = 1, where the
    sampling policy is the current one). With ``sampler_logp`` (the sampler's log-probs [D * G, T]), the
    metric ``sampler_vs_trainer_logp`` = token mean of |logp - sampler_logp| (0 of T when they agree).
    """
    I, G, S = shape
    base, adapter = (lora, None) if full_finetune else (params, lora)
    logp, emb = teacher_forced_shared(
        base, adapter, lora_scale, batch["prompts"], batch["gen_tokens"], batch["gen_lengths"], G, cfg, opts, rcfg
    )
    loss, m = grpo.grpo_loss(
        logp,
        batch.get("old_logp"),
        batch["ref_logp"],
        batch["adv"],
        batch["mask"],
        eps_low=rcfg.eps_low,
        eps_high=rcfg.eps_high,
        beta=rcfg.beta,
        kl_estimator=rcfg.kl_estimator,
        kl_bias_correction=rcfg.kl_bias_correction,
        loss_type=rcfg.loss_type,
        max_completion_length=batch["mask"].shape[1],
    )
    if denominator is not None:  # loss_sum / denominator of the whole batch (the mask is not a parameter)
        loss = loss * (m["denominator"] / jnp.maximum(denominator, 1e-9))
    metrics = {**m, "grpo_loss": loss}
    if "sampler_logp" in batch:
        gap = jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logp"])
        metrics["sampler_vs_trainer_logp"] = jnp.sum(jnp.where(batch["mask"], gap, 0.0)) / jnp.maximum(
            m["num_tokens"], 1.0
        )
    if rcfg.aux_soft_rank_weight:
        sims = rollout_similarities(prompt_major_to_rollouts(emb, I, G, S), I, G, S)
        aux = soft_ranking_loss(sims, reward_cfg, jnp.repeat(batch["valid"][:, None, :], G, axis=1))
        loss = loss + rcfg.aux_soft_rank_weight * aux_fraction * aux
        metrics["aux_soft_rank_loss"] = aux
    metrics["loss"] = loss
    return loss, metrics


def split_instances(batch: dict, shape: tuple[int, int, int], micro_instances: int) -> dict:
    """A prompt-major RL batch -> M = I / micro_instances micro-batches stacked on a new leading axis.

    Micro-batch j holds instances [j*m, (j+1)*m): their S*G sampled rows and their ``valid`` rows.
    ``batch["prompts"]`` must already be per micro-batch when M > 1 (each chunk's model inputs built
    from its own prompts and stacked, ``positions`` [M, 3, m*S, P]): images are packed into patch
    rows across prompts, so the prompt arrays cannot be cut by rows. With M = 1 they are the flat
    inputs and get a leading axis of 1.
    """
    I, G, S = shape
    m = micro_instances or I
    if I % m:
        raise ValueError(f"{I} instances per step do not split into micro-batches of {m}")
    M = I // m

    def rows(x):
        return x.reshape(M, x.shape[0] // M, *x.shape[1:])

    out = {k: rows(v) for k, v in batch.items() if k != "prompts"}
    prompts = batch["prompts"]
    if M == 1:
        out["prompts"] = {k: v[None] for k, v in prompts.items()}
    else:
        pos = prompts["positions"]
        if pos.ndim != 4 or pos.shape[0] != M or pos.shape[2] != m * S:
            raise ValueError(
                f"with {M} micro-batches the prompts must be stacked per micro-batch (positions [M, 3, m*S, P] "
                f"= [{M}, 3, {m * S}, P]), got positions {tuple(pos.shape)}"
            )
        out["prompts"] = prompts
    return out


def rl_loss_and_grad(lora, params, micro: dict, *, rcfg: RLConfig, shape: tuple[int, int, int], **loss_kw):
    """(loss, metrics, LoRA gradient) of a batch given as M micro-batches (`split_instances`).

    Gradients are summed over a ``lax.scan`` of the micro-batches (one micro-batch's activations live
    at a time); each micro-batch's GRPO term is divided by the whole batch's denominator and its
    auxiliary term weighted 1/M, so the result equals the one-pass gradient exactly (up to float
    summation order). Metrics: the summed loss terms; token statistics averaged over micro-batches.
    """
    I, G, S = shape
    M = micro["mask"].shape[0]
    mask = micro["mask"].reshape(-1, micro["mask"].shape[-1])
    _, denom = grpo.aggregate(
        jnp.zeros(mask.shape, jnp.float32), mask, rcfg.loss_type, max_completion_length=mask.shape[-1]
    )
    grad_fn = jax.value_and_grad(rl_loss, has_aux=True)

    def body(acc, mb):
        (loss, m), g = grad_fn(
            lora, params, mb, rcfg=rcfg, shape=(I // M, G, S), denominator=denom, aux_fraction=1.0 / M, **loss_kw
        )
        return jax.tree.map(jnp.add, acc, g), m

    grads, ms = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, lora), micro)
    summed = ("loss", "grpo_loss", "loss_sum", "denominator", "num_tokens")
    n_tok = ms.get("num_tokens")
    metrics = {}
    for k, v in ms.items():
        if k in summed:
            metrics[k] = jnp.sum(v)
        elif n_tok is not None and k != "aux_soft_rank_loss":  # token statistics: weighted by tokens
            metrics[k] = jnp.sum(v * n_tok) / jnp.maximum(jnp.sum(n_tok), 1)
        else:
            metrics[k] = jnp.mean(v)
    metrics["denominator"] = denom
    return metrics["loss"], metrics, grads
