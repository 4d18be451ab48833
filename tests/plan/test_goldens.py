"""Golden sharding dumps: freshly derived PartitionSpecs must equal the checked-in ones.

After an intended sharding change: python -m elva_jax.plan --dump-goldens tests/goldens (review the diff).
"""

from __future__ import annotations

import json
import os

import pytest

from elva_jax.plan.goldens import GOLDEN_CONFIGS, GOLDEN_MESHES, diff, golden_name, sharding_dump

GOLDENS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "goldens")
UPDATE = "if the change is intended: python -m elva_jax.plan --dump-goldens tests/goldens"


@pytest.mark.parametrize("mesh", GOLDEN_MESHES, ids=lambda m: "data{}_fsdp{}_tensor{}".format(*m))
@pytest.mark.parametrize("config", GOLDEN_CONFIGS)
def test_specs_equal_the_goldens(config, mesh):
    path = os.path.join(GOLDENS, golden_name(config, mesh))
    assert os.path.exists(path), f"missing golden {path}; {UPDATE}"
    with open(path) as f:
        expected = json.load(f)
    actual = json.loads(json.dumps(sharding_dump(config, mesh)))
    changes = diff(expected, actual)
    assert not changes, f"{len(changes)} sharding change(s) vs {path}:\n  " + "\n  ".join(changes[:30]) + f"\n{UPDATE}"


def _spec(dump, group, name):
    return dump[group][name]["spec"]


def test_7b_specs_by_hand():
    """Independent of the goldens: what the (data, fsdp, tensor) design says for Qwen2-VL-7B."""
    d = sharding_dump("qwen2vl_7b_mbeir", (1, 8, 2))
    assert _spec(d, "params", "text/layers/q_proj/kernel") == [None, "fsdp", "tensor"]
    assert _spec(d, "params", "text/layers/o_proj/kernel") == [None, "tensor", "fsdp"]
    assert _spec(d, "params", "text/layers/down_proj/kernel") == [None, "tensor", "fsdp"]
    assert _spec(d, "params", "text/embed_tokens/embedding") == ["tensor", "fsdp"]
    assert _spec(d, "params", "text/lm_head/kernel") == ["fsdp", "tensor"]
    assert _spec(d, "params", "vision/blocks/qkv/kernel") == [None, "fsdp", "tensor"]
    assert _spec(d, "lora", "q_proj/a") == [None, "fsdp", None]
    assert _spec(d, "lora", "q_proj/b") == [None, None, "tensor"]
    rows = ["data", "fsdp"]
    assert _spec(d, "batch", "query/input_ids") == [None, rows, None]
    assert _spec(d, "batch", "cand/patches") == [None, rows, None, None]
    assert _spec(d, "rl_batch", "prompts/positions") == [None, rows, None]
    assert _spec(d, "kv_cache", "k") == [None, rows, None, "tensor", None]
    assert d["params"]["text/layers/q_proj/kernel"]["shape"] == [28, 3584, 3584]


def test_a_moved_tensor_is_reported():
    d = sharding_dump("tiny_cpu", (2, 4, 1))
    moved = json.loads(json.dumps(d))
    moved["params"]["text/layers/q_proj/kernel"]["spec"] = [None, None, "tensor"]
    changes = diff(d, moved)
    assert len(changes) == 1 and "text/layers/q_proj/kernel" in changes[0]
