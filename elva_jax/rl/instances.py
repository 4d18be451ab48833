"""RL instances: a query, its positive and its negatives, read by index from the training data.

Negatives are the data set's own plus seeded random pool candidates (``rl.negatives=dataset``), or mined
with the current model's embeddings (``mined``: the paper's balanced hard + random sampling, false
negatives filtered; `elva_jax.rl.negatives`). A seeded share of the queries becomes instances
(`select_instances`), and a seeded few are held out as the probe set (`split_probe`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from elva_jax import configlib
from elva_jax.data.records import ContrastiveRecords, CorpusRecords
from elva_jax.data.tables import concat
from elva_jax.rl.negatives import mine_cached
from elva_jax.runtime.run_data import open_run_source, policy_drops, report_drops, training_files
from elva_jax.schema import RunConfig


def random_negatives(record: dict, pool_sides, n_random: int, seed: int, position: int) -> list[int]:
    """Indices into ``pool_sides`` of the ``n_random`` random negatives of the record at ``position`` of
    the instance list: a permutation of the pool seeded by ``[seed, position]``, taken in order, skipping
    sides whose (text, image) equal one of the record's own candidates. ``pool_sides`` is any sequence of
    sides (read only at the permutation's first entries)."""
    if n_random <= 0:
        return []
    own = {(c.get("text"), c.get("image")) for c in record["cands"]}
    rng = np.random.default_rng([seed, position])
    picks: list[int] = []
    for j in rng.permutation(len(pool_sides)):
        c = pool_sides[int(j)]
        if (c.get("text"), c.get("image")) not in own:
            picks.append(int(j))
        if len(picks) == n_random:
            break
    return picks


def add_random_negatives(records: list[dict], pool_sides: list[dict], n_random: int, seed: int) -> list[dict]:
    """Append n_random candidates drawn (seeded per record) from the pool, avoiding the record's own."""
    out = []
    for i, r in enumerate(records):
        picks = random_negatives(r, pool_sides, n_random, seed, i)
        out.append({**r, "cands": r["cands"] + [pool_sides[j] for j in picks]})
    return out


class RLInstances(Sequence):
    """RL instances read by index from a data source (``elva_jax.data.sources``), so prepared shards give
    the RL stage the images' bytes without holding them all in memory.

    Instance i is record ``base[selected[i]]`` (a :class:`~elva_jax.data.records.ContrastiveRecords`:
    query, positive, hard negatives) with extra candidates appended: the pool items ``extra[i]`` (mined
    negatives, pool row indices) when given, else ``n_random`` random negatives drawn exactly as
    :func:`add_random_negatives` draws them for position i. ``pool_items``: the pool's corpus records
    (:class:`~elva_jax.data.records.CorpusRecords`) by row. Equal, element by element, to the list the
    files-only builder made (image bytes aside)."""

    def __init__(self, base, selected, pool_items, *, extra=None, n_random: int = 0, seed: int = 0):
        self.base, self.selected, self.pool_items = base, list(selected), pool_items
        self.extra, self.n_random, self.seed = extra, n_random, seed
        self.pool_sides = _Items(pool_items)

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"instance {i} of {len(self)}")
        r = self.base[self.selected[i]]
        picks = (
            self.extra[i]
            if self.extra is not None
            else random_negatives(r, self.pool_sides, self.n_random, self.seed, i)
        )
        return {**r, "cands": r["cands"] + [self.pool_sides[j] for j in picks]}


class Subset(Sequence):
    """``base[rows[i]]`` by index (a view: nothing is read until asked for)."""

    def __init__(self, base, rows):
        self.base, self.rows = base, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.base[self.rows[i]]


def split_probe(instances, n_probe: int, seed: int):
    """(training instances, probe instances): ``n_probe`` instances held out of training by a seeded
    choice (the same for every run with this seed and count), both in their original order."""
    if n_probe <= 0:
        return instances, None
    if n_probe >= len(instances):
        raise ValueError(f"rl.probe_instances {n_probe} leaves none of the {len(instances)} RL instances to train on")
    perm = np.random.default_rng([seed, 101]).permutation(len(instances))
    return Subset(instances, sorted(perm[n_probe:])), Subset(instances, sorted(perm[:n_probe]))


class _Items(Sequence):
    """``corpus[i]["item"]`` by index (a pool's sides)."""

    def __init__(self, corpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i):
        return self.corpus[i]["item"]


def select_instances(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A deterministic `fraction` of the records, at least one per dataset id prefix ("9:..." -> 9)."""
    if fraction >= 1.0:
        return list(records)
    by_ds: dict[str, list[dict]] = {}
    for r in records:
        by_ds.setdefault(str(r["id"]).split(":")[0], []).append(r)
    rng = np.random.default_rng(seed)
    out = []
    for ds in sorted(by_ds):
        rs = by_ds[ds]
        n = max(1, int(round(fraction * len(rs))))
        out += [rs[i] for i in sorted(rng.choice(len(rs), n, replace=False))]
    return out


def build_rl_instances(
    cfg: RunConfig,
    root: str,
    *,
    embed=None,
    dropped: list[str] | None = None,
    stats_out: dict | None = None,
):
    """RL instances: query + positive + negatives, from the training queries, read by index through
    ``data.source`` (an :class:`RLInstances` sequence; from prepared shards the sides
    carry the images' bytes).

    rl.negatives = "dataset": the first `num_hard_negatives` of each query's neg_cand_list plus
    `num_random_negatives` seeded random pool candidates. "mined" (the paper's balanced sampling):
    queries and pool are embedded with the current model (`rl.mining_embedding`: "eol", LamRA's EOL
    embedding, or "instruct_last", Qwen3-VL-Embedding's with `data.default_instruction` for the pool;
    cached under {run.dir}/rl/negatives), hard negatives are the nearest candidates below the
    false-negative cut (`rl.false_negative_filter`), random ones are drawn from the rest
    (`elva_jax.rl.negatives`; its stats, dropped false negatives per query among them, go to `stats_out`). Short lists
    (small pools) are filled by cycling, so every instance has the same number of candidates.
    ``embed(records, name, cache_dir) -> [n, D]`` embeds records with the current model in the mining
    convention (needed for "mined"; the run's orchestration builds it).
    """
    d, r = cfg.data, cfg.rl
    if d.kind == "nli":
        raise configlib.ConfigError("the RL stage needs M-BEIR-format data (data.kind mbeir or bundled)")
    # read by index through the data source, as the contrastive stage reads (prepared shards carry the
    # images' bytes; nothing but the small id columns is read up front)
    src = open_run_source(cfg, root)
    files, pool_file = training_files(cfg, root)
    queries, pool = concat([src.queries(f) for f in files]), src.pool(pool_file)
    instructions = src.instructions(d.instructions_file)
    pool_items = CorpusRecords(pool, src.image_root)
    drops = policy_drops(cfg)
    n_hard = r.num_hard_negatives if r.negatives == "dataset" else 0
    base = ContrastiveRecords(
        queries, pool, src.image_root, instructions=instructions, num_negatives=n_hard, dropped=drops
    )
    report_drops(cfg, "RL instances", drops, len(queries), dropped)
    qids = queries.column("qid")
    ids = [{"id": qids[row], "index": i} for i, row in enumerate(base.query_rows)]
    selected = [x["index"] for x in select_instances(ids, r.query_fraction, cfg.train.seed)]
    if r.negatives == "dataset":
        return RLInstances(base, selected, pool_items, n_random=r.num_random_negatives, seed=cfg.train.seed)
    if embed is None:
        raise ValueError("rl.negatives=mined needs an embed function (the current model's embeddings)")
    pos_lists = queries.column("pos_cand_list")
    dids = pool.column("did")
    index = base.pool_index
    cache = os.path.join(cfg.run.dir, "rl", "negatives")
    # one cache entry per convention (the EOL names are the original ones, so existing caches stay valid)
    tag = "" if r.mining_embedding == "eol" else f".{r.mining_embedding}"
    chosen = [base[i] for i in selected]
    q_records = [{"id": b["id"], "item": b["query"]} for b in chosen]
    q_emb = np.asarray(embed(q_records, f"queries{tag}", cache))
    # the Embedder holds its records in memory: a prepared pool's image bytes with them
    p_emb = np.asarray(embed(pool_items, f"pool{tag}", cache))
    positives = [{index[x] for x in pos_lists[base.query_rows[i]] if x in index} for i in selected]
    del chosen, q_records
    negs, stats = mine_cached(
        os.path.join(cache, "negatives.json"),
        [ids[i]["id"] for i in selected],
        dids,
        q_emb,
        p_emb,
        positives,
        n_hard=r.num_hard_negatives,
        n_random=r.num_random_negatives,
        threshold=r.false_negative_threshold,
        seed=cfg.train.seed,
        filter_rule=r.false_negative_filter,
        margin=r.false_negative_margin,
    )
    stats = {k: v for k, v in stats.items() if k != "dropped_per_query"}  # per query: in negatives.json
    if stats_out is not None:
        stats_out.update(stats)
    print(
        f"[elva_jax] RL negatives: false negatives dropped per query mean {stats.get('dropped_mean', 0.0):.2f}, "
        f"max {stats.get('dropped_max')}, {stats.get('queries_with_drops')}/{stats.get('queries')} queries with "
        f"drops ({stats.get('filter')}); {stats}",
        flush=True,
    )
    n_neg = r.num_hard_negatives + r.num_random_negatives
    extra = []
    for i in selected:
        got = negs[ids[i]["id"]]
        if not got:
            raise ValueError(f"query {ids[i]['id']!r}: no negatives left in the pool after filtering")
        extra.append([index[got[j % len(got)]] for j in range(n_neg)])
    return RLInstances(base, selected, pool_items, extra=extra)
