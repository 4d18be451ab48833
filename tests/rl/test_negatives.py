"""Balanced negative mining against a brute-force oracle; the cache is reused."""

from __future__ import annotations

import numpy as np

from elva_jax.rl.negatives import mine, mine_cached


def _data(seed=0, Q=6, C=300, D=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((Q, D))
    c = rng.standard_normal((C, D))
    c[:5] = q[0] + 0.05 * rng.standard_normal((5, D))  # near-duplicates of query 0: false negatives
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    pos = [{int(i)} for i in rng.integers(5, C, Q)]
    return q.astype(np.float32), c.astype(np.float32), pos


def test_hard_negatives_equal_brute_force():
    q, c, pos = _data()
    thr = 0.9
    neg, stats = mine(q, c, pos, n_hard=10, n_random=7, threshold=thr, seed=1)
    s = q @ c.T
    for i in range(len(q)):
        order = np.argsort(-s[i], kind="stable")
        want = [j for j in order if j not in pos[i] and s[i, j] <= thr][:10]
        assert neg[i][:10] == want
        rand = neg[i][10:]
        assert len(rand) == 7 and len(set(rand)) == 7
        assert not set(rand) & (set(want) | pos[i]) and all(s[i, j] <= thr for j in rand)
    assert stats["false_negatives_dropped"] >= 5  # the planted near-duplicates of query 0


def test_cache_is_reused(tmp_path):
    q, c, pos = _data(1)
    ids_q = [f"q{i}" for i in range(len(q))]
    ids_c = [f"c{i}" for i in range(len(c))]
    kw = dict(n_hard=5, n_random=5, threshold=0.95, seed=0)
    a, s1 = mine_cached(str(tmp_path / "neg.json"), ids_q, ids_c, q, c, pos, **kw)
    b, s2 = mine_cached(str(tmp_path / "neg.json"), ids_q, ids_c, q, c, pos, **kw)
    assert s1["cache"] == "miss" and s2["cache"] == "hit" and a == b
    _, s3 = mine_cached(str(tmp_path / "neg.json"), ids_q, ids_c, q * 0.5, c, pos, **kw)
    assert s3["cache"] == "miss"  # different embeddings: recomputed


def test_rl_instances_mined_with_the_instruct_last_embedding(tmp_path):
    """rl.mining_embedding=instruct_last: queries and pool are embedded the Qwen3-VL-Embedding way (own
    cache entries, the convention in their fingerprint) and every instance gets its mined negatives."""
    import json

    import jax

    from elva_jax import configlib
    from elva_jax.data.benchmarks.multigrain.generator import generate
    from elva_jax.data.tokenize import Tokenizer
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config
    from elva_jax.rl.instances import build_rl_instances
    from elva_jax.schema import RunConfig
    from elva_jax.train.stages import mining_embed

    assert configlib.load(RunConfig, None, []).rl.mining_embedding == "eol"  # today's behaviour by default
    generate(tmp_path / "data", seed=0, n_train=2, n_test=1)
    cfg = configlib.load(
        RunConfig,
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            "data.kind=bundled",
            f"data.root={tmp_path / 'data'}",
            "data.seq_buckets=[128]",
            "data.patch_row_len=64",
            "rl.mining_embedding=instruct_last",
            "rl.query_fraction=0.2",
            "rl.num_hard_negatives=2",
            "rl.num_random_negatives=1",
        ],
    )
    mcfg = preset_config("tiny")
    params = init_params(mcfg, jax.random.key(0))
    tok = Tokenizer.from_dir(geometry=mcfg.vision.geometry)
    inst = build_rl_instances(cfg, str(tmp_path / "data"), embed=mining_embed(cfg, params, mcfg, tok))
    assert inst and all(len(x["cands"]) == 1 + 3 for x in inst)
    cache = tmp_path / "run" / "rl" / "negatives"
    for name in ("queries.instruct_last", "pool.instruct_last"):
        embed = json.loads((cache / name / "index.json").read_text())["fingerprint"]["embed"]
        assert embed["mode"] == "instruct_last" and embed["default_instruction"] == "Represent the user's input."
    assert not (cache / "queries").exists()  # the EOL entries are untouched


def test_relative_filter_and_drop_counts_equal_brute_force():
    """filter_rule=relative drops candidates above (best positive score - margin); counts per query."""
    q, c, pos = _data(3)
    pos[1] = {int(j) for j in np.argsort(-(q[1] @ c.T))[3:5]}  # positives near the top: ties of rank matter
    for margin in (0.1, 0.3, -0.05):
        neg, stats = mine(
            q,
            c,
            pos,
            n_hard=8,
            n_random=4,
            threshold=0.95,
            seed=2,
            filter_rule="relative",
            margin=margin,
            search_k=len(c),
        )
        s = q @ c.T
        for i in range(len(q)):
            cut = max(s[i, j] for j in pos[i]) - margin
            order = np.argsort(-s[i], kind="stable")
            want = [j for j in order if j not in pos[i] and s[i, j] <= cut][:8]
            assert neg[i][:8] == want
            dropped = sum(1 for j in order[: stats["search_k"]] if j not in pos[i] and s[i, j] > cut)
            assert stats["dropped_per_query"][i] == dropped
            assert all(s[i, j] <= cut for j in neg[i][8:])
        assert stats["false_negatives_dropped"] == sum(stats["dropped_per_query"])
        assert stats["dropped_max"] == max(stats["dropped_per_query"])
    assert stats["queries_with_drops"] > 0 and stats["filter"] == "relative (margin -0.05)"
    # the absolute rule's per-query counts, by brute force
    _, st = mine(q, c, pos, n_hard=8, n_random=4, threshold=0.5, seed=2)
    s = q @ c.T
    want = [
        int(sum(1 for j in np.argsort(-s[i])[: st["search_k"]] if j not in pos[i] and s[i, j] > 0.5))
        for i in range(len(q))
    ]
    assert st["dropped_per_query"] == want and st["filter"] == "absolute"


def test_random_negatives_append_exactly_n_from_the_pool_and_none_for_zero():
    from elva_jax.rl.instances import add_random_negatives

    pool = [{"text": f"c{i}", "image": None} for i in range(20)]
    recs = [{"id": "q", "cands": [pool[3], pool[5]]}]
    (three,) = add_random_negatives(recs, pool, 3, seed=0)
    extra = three["cands"][2:]
    assert len(extra) == 3 and all(c in pool and c not in recs[0]["cands"] for c in extra)
    assert len({c["text"] for c in extra}) == 3
    (zero,) = add_random_negatives(recs, pool, 0, seed=0)
    assert zero["cands"] == recs[0]["cands"]  # not the whole pool
