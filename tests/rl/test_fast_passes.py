"""The RL step's fast paths (no pass that the math does not need) against the recomputing oracle.

* rl.ret_embedding="sampler": the [RET] embedding the sampler returns equals the teacher-forced pass's
  (prompts with images; rows that stop on [RET] / another stop id, and rows given a forced [RET]);
* rl.old_logp="auto" (mu = 1): the on-policy update (old = stop_gradient(logp)) gives the oracle's
  rewards, loss and LoRA gradient, with no policy re-forward; the passes that do run are counted.

fp32 tiny model, fp32 KV cache. Tolerances are stated where they are used.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from helpers.rl_setup import fresh_state, instances, make_trainer

from elva_jax.model.sampler import generate
from elva_jax.rl.rollout import RLConfig, teacher_forced_shared

RC = RLConfig(group_size=3, max_summary_tokens=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = instances(str(tmp_path_factory.mktemp("mg")), n_neg=2)
    insts = [next(i for i in data if any(s["image"] for s in [i["query"], *i["cands"]]))]  # image sides
    # SGD at lr 1: the LoRA update is minus the gradient (Adam's first step, g / |g|, would amplify the
    # rounding noise of near-zero gradient entries)
    fast, _ = make_trainer(RC, tx=optax.sgd(1.0))
    oracle, _ = make_trainer(
        dataclasses.replace(RC, old_logp="recompute", ret_embedding="recompute"), tx=optax.sgd(1.0)
    )
    assert fast.scfg.cache_dtype == "float32"  # rl.cache_dtype "compute" follows the fp32 model
    return {"insts": insts, "fast": fast, "oracle": oracle}


def _counting(tr, name, calls):
    real = getattr(tr, name)

    def wrapped(*a):
        calls.append((name, a[1] is None))  # (which pass, without LoRA = reference)
        return real(*a)

    setattr(tr, name, wrapped)


def test_sampler_ret_embedding_equals_teacher_forced(setup):
    """Samples.ret_emb vs `teacher_forced_shared` on the same tokens, with images in the prompts and
    stop ids covering a third of the vocabulary, so rows stop on a sampled stop id (fed [RET] in its
    place) as well as reach the budget (forced [RET], one extra decode step)."""
    tr = setup["fast"]
    st = fresh_state(tr)
    _, _, (I, G, S), chunks = tr.rollouts(st, setup["insts"], samples=_dummy(tr, setup["insts"]))
    x = chunks[0]
    V = tr.cfg.text.vocab_size
    stops = (tr.ret_id, tr.eos_id, *range(0, V, 3))
    gen = jax.jit(
        lambda p, lo, x, k: generate(
            p,
            x,
            k,
            tr.cfg,
            tr.opts,
            tr.scfg,
            num_samples=G,
            stop_ids=stops,
            ret_id=tr.ret_id,
            pad_id=tr.pad_id,
            lora=lo,
            lora_scale=tr.lora_scale,
            ret_embedding=True,
        )
    )
    out = jax.tree.map(np.asarray, gen(st.params, st.lora, x, jax.random.key(3)))
    forced, n = out.forced_ret, out.mask.sum(1)
    assert forced.any() and (~forced).any(), (forced, n)  # both kinds of row
    assert ((~forced) & (n < out.lengths)).any()  # a row stopped on a non-[RET] stop id: substituted
    assert (out.tokens[np.arange(len(n)), out.lengths - 1] == tr.ret_id).all()
    _, emb = jax.jit(
        lambda p, lo, x, t, ln: teacher_forced_shared(p, lo, tr.lora_scale, x, t, ln, G, tr.cfg, tr.opts, tr.rcfg)
    )(st.params, st.lora, x, out.tokens, out.lengths)
    emb = np.asarray(emb)
    np.testing.assert_allclose(np.linalg.norm(out.ret_emb, axis=1), 1.0, atol=1e-6)
    # fp32, decode-step vs one-pass attention: measured ~3e-7; a hidden state one position off is O(1)
    np.testing.assert_allclose(out.ret_emb, emb, atol=1e-5, rtol=0)


def _dummy(tr, insts):
    """Placeholder samples of the right row count (only to get the trainer's prompt chunks)."""
    from elva_jax.model.sampler import Samples

    N = (1 + len(insts[0]["cands"])) * len(insts) * tr.rcfg.group_size
    T = tr.rcfg.max_summary_tokens + 1
    return Samples(
        np.zeros((N, T), np.int32),
        np.zeros((N, T), np.float32),
        np.zeros((N, T), bool),
        np.ones(N, np.int32),
        np.zeros(N, bool),
    )


@pytest.fixture(scope="module")
def steps(setup):
    """One step of the fast trainer sampling itself, then the same samples replayed: fast with the
    sampler's embeddings, fast without them (embeddings-only re-forward), and the oracle."""
    fast, oracle, insts = setup["fast"], setup["oracle"], setup["insts"]
    res, calls = {}, {}
    for name, tr in (("fast", fast), ("oracle", oracle)):
        calls[name] = []
        _counting(tr, "_tf", calls[name])
        _counting(tr, "_tf_emb", calls[name])
    st0 = fresh_state(fast)
    lora0 = jax.tree.map(np.asarray, st0.lora)
    st, m = fast.step(st0, insts)
    smp = fast.last_samples
    res["sampled"] = (m, jax.tree.map(np.asarray, st.lora))
    no_emb = smp._replace(ret_emb=None)
    for key, tr, s in (("fast", fast, smp), ("fast_tf_emb", fast, no_emb), ("oracle", oracle, no_emb)):
        n0 = len(calls["fast" if tr is fast else "oracle"])
        st, m = tr.step(fresh_state(tr), insts, samples=s)
        res[key] = (m, jax.tree.map(np.asarray, st.lora), calls["fast" if tr is fast else "oracle"][n0:])
    return {"res": res, "lora0": lora0, "samples": smp}


def test_passes_run_only_where_needed(steps):
    r = steps["res"]
    # beta 0.2: the reference pass (no LoRA) always; the policy pass only where something is recomputed
    assert r["fast"][2] == [("_tf", True)]
    assert r["fast_tf_emb"][2] == [("_tf_emb", False), ("_tf", True)]
    assert r["oracle"][2] == [("_tf", False), ("_tf", True)]
    assert steps["samples"].forced_ret.all()  # the tiny random model runs to the budget: forced [RET]


def test_fast_step_equals_oracle(steps):
    """Same samples: the same rewards, loss and LoRA gradient (SGD lr 1: the update is -grad)."""
    r, lora0 = steps["res"], steps["lora0"]
    mo, lo, _ = r["oracle"]
    upd_o = [a - b for a, b in zip(jax.tree.leaves(lo), jax.tree.leaves(lora0), strict=True)]
    scale = max(float(np.abs(u).max()) for u in upd_o)
    assert scale > 0
    for key in ("fast", "fast_tf_emb"):
        m, lora, _ = r[key]
        # rewards ~0.2 from cosines of embeddings equal to ~1e-6: measured 3e-8
        for k in ("reward", "reward_margin", "reward_ranking"):
            assert abs(m[k] - mo[k]) <= 1e-5, (key, k, m[k], mo[k])
        upd = [a - b for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora0), strict=True)]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(upd, upd_o, strict=True))
        # the loss (~7e-5) is the KL term plus a policy term that is 0 up to rounding (on-policy, the sum of
        # each group's advantages): rewards ~0.2 that differ by ~3e-8, centred and divided by a small group
        # std, move it by 2.5e-6 (measured); the gradient, which does not cancel, agrees to 3e-6 of its scale
        assert abs(m["loss"] - mo["loss"]) <= 1e-5, (key, m["loss"], mo["loss"])
        assert abs(m["kl_mean"] - mo["kl_mean"]) <= 1e-4 * abs(mo["kl_mean"]) + 1e-9, key
        assert abs(m["grad_norm"] - mo["grad_norm"]) <= 1e-4 * mo["grad_norm"], key
        assert m["clip"] == 0.0 and mo["clip"] == 0.0  # on-policy: every ratio 1
        assert diff <= 1e-4 * scale, (key, diff, scale)
    # the on-policy update still reports how far the sampler's log-probs are from the trainer's
    for key in ("sampled", "fast", "fast_tf_emb", "oracle"):
        assert r[key][0]["sampler_vs_trainer_logp"] < 1e-4, key


def test_old_logp_auto_recomputes_for_several_updates():
    assert not RLConfig(mu=1).recompute_old_logp()
    assert RLConfig(mu=2).recompute_old_logp()
    assert RLConfig(mu=1, old_logp="recompute").recompute_old_logp()
    with pytest.raises(ValueError, match="rl.old_logp"):
        RLConfig(old_logp="sampler").recompute_old_logp()


def test_no_reference_pass_without_kl(setup):
    tr = setup["fast"]
    calls = []
    tr2 = dataclasses.replace(tr.rcfg, beta=0.0)
    saved, tr.rcfg = tr.rcfg, tr2
    try:
        _counting(tr, "_tf", calls)
        old, ref, emb = tr.reforward(
            None, [{}], np.zeros((3, 5), np.int32), np.ones(3, np.int32), 3, logps=False, embeddings=False
        )
    finally:
        tr.rcfg = saved
    assert (old, ref, emb) == (None, None, None) and calls == []
