"""Target summaries read off records (`elva_jax.data.summaries`): the accepted forms, clear errors for
malformed ones, and the sides of a bundled training set that carry them."""

from __future__ import annotations

import pytest

from elva_jax.data.benchmarks.multigrain.generator import generate
from elva_jax.data.benchmarks.multigrain.texts import N_SUMMARIES
from elva_jax.data.errors import RecordError
from elva_jax.data.records import ContrastiveRecords
from elva_jax.data.sources import open_source
from elva_jax.data.summaries import SummaryRecords, summary_targets


@pytest.mark.parametrize(
    "src, want",
    [
        (None, []),
        ("free text of the source data set", []),
        ('{"scene_id": "s1"}', []),
        ({"summary": "a red circle"}, ["a red circle"]),
        ('{"summary": ["a", "b c"]}', ["a", "b c"]),
        ([1, 2], []),
    ],
)
def test_summary_targets_forms(src, want):
    assert summary_targets(src, "q.jsonl line 3") == want


@pytest.mark.parametrize("bad", [{"summary": ""}, {"summary": []}, {"summary": ["ok", 3]}, '{"summary": 7}'])
def test_malformed_summary_names_the_record(bad):
    with pytest.raises(RecordError, match="q.jsonl line 3"):
        summary_targets(bad, "q.jsonl line 3")


def test_summary_records_of_the_bundled_training_set(tmp_path):
    generate(tmp_path, seed=0, n_train=4, n_test=2)
    src = open_source(str(tmp_path), "files")
    base = ContrastiveRecords(
        src.queries("query/train/mbeir_multigrain_union_train.jsonl"),
        src.pool("cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl"),
        src.image_root,
        instructions=src.instructions("instructions/query_instructions.tsv"),
        num_negatives=1,
    )
    recs = SummaryRecords(base)
    # every record's query and positive carry summaries; the pair is the RL prompt's query side and the
    # record's positive, with each one's alternatives
    assert len(recs) == recs.records_seen == len(base)
    for i in range(len(recs)):
        r, b = recs[i], base[recs.entries[i]]
        assert r["sides"] == [b["query"], b["cands"][0]] and r["sides"][0]["instruction"]
        assert [len(t) for t in r["targets"]] == [N_SUMMARIES] * 2
        assert r["targets"][0] == r["targets"][1]  # the query asks for the positive's scene
