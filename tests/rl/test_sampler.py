"""Sampler: cached == uncached with the same key, prefix sharing == no sharing, stop/[RET] rules, top-k/p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.contrastive import tiny_cfg, tiny_params
from helpers.draws import assert_same_draws

from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.inputs import build_inputs
from elva_jax.model.sampler import SamplerConfig, filter_logits, generate, sample_token

OPTS = ModelOptions(matmul_precision="highest")
RET, EOS, PAD = 501, 502, 0


@pytest.fixture(scope="module")
def model():
    cfg = tiny_cfg()
    return cfg, tiny_params(cfg, seed=4)


def _prompts(cfg, seed=0, with_image=True):
    rng = np.random.default_rng(seed)
    rows, grids = [], []
    for i in range(2):
        s = list(rng.integers(1, 400, 5 + 3 * i))
        if with_image and i == 1:
            s = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id] + s
            grids.append((1, 4, 4))
        rows.append(s)
    L = max(map(len, rows))
    ids = np.zeros((2, L), np.int32)
    am = np.zeros_like(ids)
    for b, s in enumerate(rows):
        ids[b, L - len(s) :], am[b, L - len(s) :] = s, 1
    pv = rng.standard_normal((16 * len(grids), 1176)).astype(np.float32) if grids else None
    return ids, am, pv, (np.array(grids) if grids else None)


def _uncached(params, cfg, ids, am, pv, g, key, scfg, G):
    """Reference: re-run the full forward on prompt + tokens so far at every step (no cache)."""
    ids = np.repeat(ids, G, 0)
    am = np.repeat(am, G, 0)
    if g is not None:  # the one image (prompt row 1) repeats with its G rows
        pv = np.concatenate([pv] * G)
        g = np.repeat(g, G, 0)
    N = ids.shape[0]
    toks = np.full((N, scfg.max_new_tokens), PAD, np.int32)
    done = np.zeros(N, bool)
    for t in range(scfg.max_new_tokens):
        cur = np.concatenate([ids, toks[:, :t]], 1)
        cam = np.concatenate([am, np.ones((N, t), np.int32)], 1)
        out = backbone.forward(params, build_inputs(cfg, OPTS, cur, cam, pv, g), cfg, OPTS, with_logits=True)
        key, sub = jax.random.split(key)
        tok, _ = sample_token(sub, out.logits[:, -1], scfg)
        tok = np.where(done, PAD, np.asarray(tok))
        toks[:, t] = tok
        done |= np.isin(tok, [RET, EOS])
        if done.all():
            break
    return toks


def test_cached_sampling_equals_uncached(model):
    cfg, params = model
    ids, am, pv, g = _prompts(cfg)
    scfg = SamplerConfig(max_new_tokens=6, temperature=1.0, cache_dtype="float32")
    key = jax.random.key(7)
    got = generate(
        params,
        build_inputs(cfg, OPTS, ids, am, pv, g),
        key,
        cfg,
        OPTS,
        scfg,
        num_samples=3,
        stop_ids=(RET, EOS),
        ret_id=RET,
        pad_id=PAD,
    )
    ref = _uncached(params, cfg, ids, am, pv, g, key, scfg, 3)
    n = scfg.max_new_tokens
    mask = np.asarray(got.mask)[:, :n]
    toks = np.where(mask, np.asarray(got.tokens)[:, :n], PAD)
    # the same draws, up to a CDF boundary moved by the cache's other reduction order
    assert_same_draws(toks, np.where(mask, ref, PAD))
    # where the sampler recorded nothing, the reference has padding or the EOS that [RET] replaced
    same = (toks == np.where(mask, ref, PAD)).all(1)
    assert np.isin(ref[same][~mask[same]], [PAD, EOS]).all()
    assert mask.sum() > 0


def test_prefix_sharing_equals_repeated_prompts(model):
    cfg, params = model
    ids, am, _, _ = _prompts(cfg, seed=3, with_image=False)
    scfg = SamplerConfig(max_new_tokens=5, cache_dtype="float32")
    key = jax.random.key(1)
    kw = dict(stop_ids=(RET, EOS), ret_id=RET, pad_id=PAD)
    shared = jax.jit(lambda p, x, k: generate(p, x, k, cfg, OPTS, scfg, num_samples=4, **kw))(
        params, build_inputs(cfg, OPTS, ids, am), key
    )
    rep = build_inputs(cfg, OPTS, np.repeat(ids, 4, 0), np.repeat(am, 4, 0))
    unshared = jax.jit(lambda p, x, k: generate(p, x, k, cfg, OPTS, scfg, num_samples=1, **kw))(params, rep, key)
    assert_same_draws(shared.tokens, unshared.tokens)
    same = (np.asarray(shared.tokens) == np.asarray(unshared.tokens)).all(1)
    np.testing.assert_allclose(np.asarray(shared.logps)[same], np.asarray(unshared.logps)[same], rtol=1e-6, atol=1e-6)


def test_every_row_ends_in_one_ret_and_logps_are_full_vocab(model):
    cfg, params = model
    ids, am, _, _ = _prompts(cfg, seed=5, with_image=False)
    scfg = SamplerConfig(max_new_tokens=3, temperature=0.7, top_k=50, cache_dtype="float32")
    out = generate(
        params,
        build_inputs(cfg, OPTS, ids, am),
        jax.random.key(2),
        cfg,
        OPTS,
        scfg,
        num_samples=8,
        stop_ids=(RET, EOS),
        ret_id=RET,
        pad_id=PAD,
    )
    toks, mask, lengths = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
    for r in range(toks.shape[0]):
        seq = toks[r, : lengths[r]]
        assert seq[-1] == RET and (seq[:-1] != RET).all()
        assert (toks[r, lengths[r] :] == PAD).all()
        assert mask[r, : lengths[r] - 1].all() and not mask[r, lengths[r] :].any()
        if out.forced_ret[r]:  # budget exhausted: the appended [RET] was not sampled
            assert not mask[r, lengths[r] - 1] and lengths[r] == scfg.max_new_tokens + 1
    assert np.all(np.asarray(out.logps)[~mask] == 0) and np.all(np.asarray(out.logps)[mask] < 0)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 2, 1.0)), [[True, True, False, False]])
    # nucleus 0.7: 0.5 (prev 0) and 0.3 (prev 0.5 < 0.7) kept; 0.15 (prev 0.8) dropped
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 0, 0.7)), [[True, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 0, 0.85)), [[True, True, True, False]])
    # the recorded log-prob is under the unfiltered distribution at temperature T
    tok, lp = sample_token(jax.random.key(0), logits, SamplerConfig(temperature=2.0, top_k=1))
    assert int(tok[0]) == 0
    np.testing.assert_allclose(float(lp[0]), float(jax.nn.log_softmax(logits[0] / 2.0)[0]), rtol=1e-6)


def test_inverse_cdf_sampling_matches_the_distribution():
    """Empirical frequencies of 200k draws vs softmax probabilities (chi-square-style bound), -inf never drawn."""
    from elva_jax.model.sampler import categorical_inverse_cdf

    logits = jnp.array([1.0, 0.0, -1.0, 2.0, -jnp.inf, 0.5])
    p = np.asarray(jax.nn.softmax(logits))
    keys = jax.random.split(jax.random.key(0), 200_000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: categorical_inverse_cdf(k, logits[None])[0]))(keys))
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert freq[4] == 0
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / len(draws)) + 1e-9), (freq, p)


def test_kth_largest_two_stage_matches_sort():
    """The two-stage k-th largest equals the k-th value of a full descending sort (numpy), ties and a
    vocabulary that is not a multiple of the block included."""
    from elva_jax.model.sampler import kth_largest

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3 * 64 + 17)).astype(np.float32)
    x[0, :40] = 9.0  # 40 tied maxima spread over the first blocks
    x[1] = np.round(x[1])  # many ties everywhere
    for k in (1, 7, 20, 64):
        want = -np.sort(-x, axis=-1)[:, k - 1 : k]
        np.testing.assert_array_equal(np.asarray(kth_largest(jnp.asarray(x), k, block=64)), want)


def test_generation_vocabulary_constrains_draws_and_log_probs(model):
    """opts.vocab: the LM head scores only those ids (equal to the full head's logits there, -1e9 elsewhere),
    every sampled token is one of them, and a sampled token's log-prob is log_softmax over the subset
    (numpy, from the full head's logits of an uncached forward)."""
    cfg, params = model
    vocab = (7, 19, 64, 230, 399, RET, EOS)
    vopts = ModelOptions(matmul_precision="highest", vocab=vocab)
    h = jax.random.normal(jax.random.key(0), (3, cfg.text.hidden_size))
    full = np.asarray(backbone.lm_head(params, h, cfg, OPTS))
    sub = np.asarray(backbone.lm_head(params, h, cfg, vopts))
    np.testing.assert_allclose(sub[:, list(vocab)], full[:, list(vocab)], rtol=1e-6, atol=1e-6)
    others = np.setdiff1d(np.arange(cfg.text.vocab_size), vocab)
    assert np.all(sub[:, others] == -1e9)
    ids, am, _, _ = _prompts(cfg, seed=6, with_image=False)
    scfg = SamplerConfig(max_new_tokens=4, cache_dtype="float32")
    out = generate(
        params, build_inputs(cfg, vopts, ids, am), jax.random.key(3), cfg, vopts, scfg, num_samples=4,
        stop_ids=(RET, EOS), ret_id=RET, pad_id=PAD,
    )  # fmt: skip
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert set(toks[mask].tolist()) <= set(vocab)
    # the first token's log-prob against the full head's last-position logits restricted to the subset
    fwd = backbone.forward(params, build_inputs(cfg, OPTS, ids, am), cfg, OPTS, with_logits=True)
    last = np.asarray(fwd.logits[:, -1], np.float64)[:, list(vocab)]
    logp = last - np.log(np.exp(last - last.max(1, keepdims=True)).sum(1, keepdims=True)) - last.max(1, keepdims=True)
    for r in range(toks.shape[0]):
        j = vocab.index(int(toks[r, 0]))
        assert np.asarray(out.logps)[r, 0] == pytest.approx(logp[r // 4, j], abs=1e-4)


def test_generation_vocab_of_words():
    from elva_jax.data.tokenize import Tokenizer, generation_vocab

    tok = Tokenizer.from_dir()
    ids = generation_vocab(tok, ("red", "top"))
    for text in ("red", " red", "top", " top", ","):
        assert set(tok.ids(text)) <= set(ids), text
    assert tok.ret_token_id in ids and tok.ids("<|im_end|>")[0] in ids
    assert generation_vocab(tok, ()) == ()
    assert list(ids) == sorted(set(ids))


def test_token_logps_over_the_generation_vocabulary(model):
    """The trainer's log-probs (`rl.rollout.token_logps`) with a generation vocabulary equal log_softmax over
    the subset's logits of the full head (numpy), for targets inside it."""
    from elva_jax.rl.rollout import token_logps

    cfg, params = model
    vocab = (7, 19, 64, 230, 399, RET, EOS)
    vopts = ModelOptions(matmul_precision="highest", vocab=vocab)
    h = jax.random.normal(jax.random.key(1), (3, 4, cfg.text.hidden_size))
    targets = np.array([[7, 19, RET, 7], [64, 64, 399, EOS], [230, 7, 19, RET]], np.int32)
    got = np.asarray(token_logps(params, h, jnp.asarray(targets), cfg, vopts, 0.7, 2))
    full = np.asarray(backbone.lm_head(params, h, cfg, OPTS), np.float64)[..., list(vocab)] / 0.7
    lse = np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1)) + full.max(-1)
    want = np.take_along_axis(full, np.vectorize(vocab.index)(targets)[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
