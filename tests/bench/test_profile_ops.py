"""The op-level profile summary of the benchmarks (`elva_jax.bench.profile_ops`): self times of nested
events against a hand-computed case, HLO categories of a small compiled program, and a real trace of it
whose matmul ops are found and timed."""

from __future__ import annotations

from types import SimpleNamespace as NS

import jax
import jax.numpy as jnp
import pytest

from elva_jax.bench.profile_ops import (
    aten_category,
    hlo_categories,
    op_self_times,
    self_times,
    summarize,
    xla_op_times,
)


def test_self_times_subtract_nested_events():
    # while [0, 100) holds body ops a [10, 40) and b [50, 70); c [120, 130) after it; a again [200, 205)
    evs = [("while", 0, 100), ("a", 10, 30), ("b", 50, 20), ("c", 120, 10), ("a", 200, 5)]
    assert self_times(evs) == {"while": 50, "a": 35, "b": 20, "c": 10}
    # two levels: x [0, 10) > y [1, 9) > z [2, 4)
    assert self_times([("z", 2, 2), ("x", 0, 10), ("y", 1, 8)]) == {"x": 2, "y": 6, "z": 2}


def test_only_xla_thunk_events_count_as_ops():
    def ev(name, start, dur):
        return NS(name=name, start_ns=start, duration_ns=dur)

    tracer = ev("$<frozen abc>:117 __instancecheck__", 2, 3)
    thunks = [ev("ThreadpoolListener::StartRegion", 0, 1), ev("dot.1", 0, 10), tracer, ev("fusion.2", 20, 5)]
    xla = NS(name="tf_XLAPjRtCpuClient/1", events=thunks)
    other = NS(name="python", events=[ev("$profiler.py:151 start_trace", 0, 50), ev("PjitFunction(f)", 1, 40)])
    stray = NS(name="some_worker_thread", events=[ev("copy.3", 0, 7)])
    planes = [NS(name="/host:CPU", lines=[other, xla, stray])]
    assert op_self_times(planes) == {"dot.1": 10, "fusion.2": 5}
    assert op_self_times(planes, only={"dot.1"}) == {"dot.1": 10}  # another program's fusion.2 left out


@pytest.fixture(scope="module")
def compiled():
    def loss(w, x):
        h = jnp.tanh(x @ w[0])
        return jax.nn.logsumexp(h @ w[1], -1).sum()

    f = jax.jit(jax.grad(loss))
    args = ([jnp.full((64, 128), 0.01), jnp.full((128, 32), 0.01)], jnp.ones((16, 64)))
    return f.lower(*args).compile(), args


def test_hlo_categories_find_the_matmuls(compiled):
    c, _ = compiled
    cats = hlo_categories(c.as_text())
    # forward 2 matmuls, backward 3 (dW1, dW0 and dx of layer 1; dx of layer 0 is not needed): 5 dots
    n_dot = sum(1 for k, (cat, _) in cats.items() if cat == "matmul")
    assert n_dot == 5, cats
    assert any(cat == "elementwise/reduce" for cat, _ in cats.values())
    assert aten_category("aten::addmm") == "matmul" and aten_category("aten::copy_") == "data movement"
    assert aten_category("aten::embedding_dense_backward") == "gather/scatter"
    assert aten_category("aten::mul") == "elementwise/reduce"


def test_a_trace_is_summarised_op_by_op(compiled, tmp_path):
    c, args = compiled
    jax.block_until_ready(c(*args))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(c(*args))
    cats = hlo_categories(c.as_text())
    ops = xla_op_times(str(tmp_path), only=cats)  # another test's computation may run during the trace
    assert ops and set(ops) <= set(cats) | {"while", "call"}, set(ops) - set(cats)
    assert any(cats[n][0] == "matmul" for n in ops)
    s = summarize(ops, cats, steps=3, top=5)
    assert abs(sum(s["categories"].values()) - 1) < 1e-2 and s["categories"]["matmul"] > 0
    assert len(s["top_ops"]) == 5 and s["op_time_per_step_s"] > 0
    assert s["top_ops"][0]["ms_per_step"] >= s["top_ops"][-1]["ms_per_step"]
