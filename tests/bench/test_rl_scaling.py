"""The W4 cost-curve driver (`elva_jax.bench.rl_scaling`) without running the benchmark: the fitted growth
against numpy's least squares, which configurations run (shared base point, reference skipped above its
limit, rematerialisation only past --remat-above) and --resume reusing measured points."""

from __future__ import annotations

import json

import numpy as np
import pytest

import elva_jax.bench.rl_scaling as sc


def test_loglog_slope_is_the_least_squares_exponent():
    xs = np.array([9.0, 33.0, 102.0])
    ys = 3.0 * xs**1.5 * np.array([1.0, 1.1, 0.95])
    want = np.polyfit(np.log(xs), np.log(ys), 1)[0]
    assert sc.loglog_slope(xs, ys) == pytest.approx(want, abs=1e-3)
    assert sc.loglog_slope([9], [1.0]) is None


@pytest.fixture()
def fake_runs(monkeypatch):
    calls = []

    def run_one(side, cfg, steps, timeout, data, remat=False):
        calls.append((side, cfg["candidates"], cfg["G"], cfg["summary"], remat))
        n = cfg["G"] * (1 + cfg["candidates"])
        t = {"time_rollout_s": 0.01 * n, "time_reforward_s": 0.02 * n, "time_update_s": 0.07 * n}
        return {"step_s": 0.1 * n, "peak_rss_mb": 100.0 + n, **t}

    monkeypatch.setattr(sc, "run_one", run_one)
    monkeypatch.setattr("elva_jax.bench.rl_step.bench_instances", lambda *a, **k: None)
    return calls


def test_grid_runs_each_configuration_once(fake_runs, tmp_path):
    out = str(tmp_path / "s")
    args = ["--candidates", "9,33", "--groups", "4,8", "--summaries", "16", "--out", out]
    res = sc.main(args + ["--torch-max-sequences", "100", "--remat-above", "200"])
    # the base (9, 8, 16) is on every axis but measured once per side; torch skipped at 8 x 34 = 272 sequences
    assert sorted(fake_runs) == sorted(
        [("jax", 9, 8, 16, False), ("torch", 9, 8, 16, False), ("jax", 33, 8, 16, True), ("jax", 9, 4, 16, False),
         ("torch", 9, 4, 16, False)]
    )  # fmt: skip
    skipped = [r for r in res["results"] if "skipped" in r]
    assert [(r["side"], r["candidates"]) for r in skipped] == [("torch", 33)]
    # time = 0.1 G (1 + C): along the candidate axis slope log(34/10) / log(33/9) for the step time
    want = np.log(34 / 10) / np.log(33 / 9)
    assert res["fits"]["jax/candidates"]["step_s_slope"] == pytest.approx(want, abs=1e-3)
    assert json.loads((tmp_path / "s.json").read_text())["fits"] == res["fits"]
    assert (tmp_path / "s.svg").read_text().startswith("<svg")
    # --resume: nothing measured again but the skipped point
    fake_runs.clear()
    sc.main(args + ["--resume", "--torch-max-sequences", "1000"])
    assert fake_runs == [("torch", 33, 8, 16, False)]
