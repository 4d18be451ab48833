"""A training query that makes no record (its positive is not in the pool): the fail policy stops the run
naming the query; the skip policy leaves it out, says so, counts it and stops past max_skip_fraction."""

from __future__ import annotations

import json

import pytest

from elva_jax import configlib
from elva_jax.data.errors import RecordError, SkippedFractionError
from elva_jax.rl.instances import build_rl_instances
from elva_jax.runtime.run_data import BUNDLED_TRAIN, build_records
from elva_jax.schema import RunConfig


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    from elva_jax.data.benchmarks.multigrain.generator import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, seed=0)
    path = root / BUNDLED_TRAIN
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["pos_cand_list"] = ["10:999999"]
    lines[0] = json.dumps(first)
    path.write_text("\n".join(lines) + "\n")
    return root, first["qid"], len(lines)


def _cfg(root, *over):
    return configlib.load(RunConfig, None, ["data.kind=bundled", f"data.root={root}", "rl.negatives=dataset", *over])


def test_fail_policy_names_the_query(broken_data):
    root, qid, _ = broken_data
    with pytest.raises(RecordError, match=f"query '{qid}'.*not in the pool"):
        build_records(_cfg(root, "data.image_policy=fail"), str(root))


def test_skip_policy_leaves_it_out_and_counts_it(broken_data, capsys):
    root, qid, n = broken_data
    dropped: list[str] = []
    cfg = _cfg(root, "data.image_policy=skip", "data.max_skip_fraction=0.05")
    recs = build_records(cfg, str(root), dropped)
    assert len(recs) == n - 1 and qid not in {r["id"] for r in recs}
    assert len(dropped) == 1 and qid in dropped[0]
    assert "left out 1 of" in capsys.readouterr().out
    rl_dropped: list[str] = []
    inst = build_rl_instances(cfg, str(root), dropped=rl_dropped)
    assert len(rl_dropped) == 1 and qid not in {r["id"] for r in inst}


def test_skip_policy_stops_past_the_fraction(broken_data):
    root, _, _ = broken_data
    with pytest.raises(SkippedFractionError, match="data.max_skip_fraction"):
        build_records(_cfg(root, "data.image_policy=skip", "data.max_skip_fraction=0.001"), str(root))
