"""The learning report's statistics against hand-computed values and numpy's polyfit; the figure from a
synthetic report; the bundled set's sizes are checked, never silently reused or overwritten."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from elva_jax.data.benchmarks.multigrain.generator import BundledSizeError, ensure_generated
from elva_jax.report.learning import aggregate, finished, recall_summary, slope, t_interval, targets
from elva_jax.report.plot import learning_curves


def test_slope_matches_polyfit():
    y = np.random.default_rng(0).standard_normal(30) + 0.01 * np.arange(30)
    assert slope(y) == pytest.approx(np.polyfit(np.arange(1, 31), y, 1)[0], rel=1e-12)
    assert slope([1.0, 3.0]) == pytest.approx(2.0)
    assert math.isnan(slope([1.0]))


def test_variant_overrides_keep_list_values_whole():
    from elva_jax.report.learning import split_overrides

    assert split_overrides("train.stages=[sft,contrastive],train.max_steps=2400") == [
        "train.stages=[sft,contrastive]",
        "train.max_steps=2400",
    ]
    assert split_overrides("rl.aux_soft_rank_weight=1") == ["rl.aux_soft_rank_weight=1"]


def test_t_interval_by_hand():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    half = 4.303 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def _results(path, r1s, n_cand=64, gm=0.01):
    tasks = {
        f"t{i}": {"group": "bundled", "recall": {"1": r, "5": min(1.0, 3 * r)}, "n_candidates": n_cand}
        for i, r in enumerate(r1s)
    }
    tasks["m0"] = {"group": "mrbench", "recall": {"1": 1.0, "5": 1.0}, "n_candidates": 8}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"settings": {"mode": "eol"}, "tasks": tasks, "grain_masking": {"mean_cosine_distance": gm}})
    )
    return path


def test_recall_summary_and_targets(tmp_path):
    s = recall_summary(_results(tmp_path / "a" / "results.json", [0.0, 0.25]))
    assert s["r1"] == pytest.approx(0.125) and s["r5"] == pytest.approx(0.375)  # mrbench task left out
    assert s["chance_r1"] == pytest.approx(1 / 64) and s["chance_r5"] == pytest.approx(5 / 64)
    runs = [
        {"eval": {"before_rl-eol": s}, "rl": {"reward": list(0.1 * np.arange(5) + k), "slope": 0.1 + 0.01 * k}}
        for k in range(3)
    ]
    agg = aggregate(runs)
    assert agg["reward_slope"]["excludes_zero"] and agg["reward_slope"]["mean"] == pytest.approx(0.11)
    t = targets(agg)
    assert t["contrastive_r1_x_chance"]["value"] == pytest.approx(8.0) and t["contrastive_r1_x_chance"]["met"]
    assert t["rl_reward_slope"]["met"]
    flat = aggregate([{**r, "rl": {**r["rl"], "slope": (-1) ** k * 0.1}} for k, r in enumerate(runs)])
    assert not targets(flat)["rl_reward_slope"]["met"]


def test_probe_slope_interval_and_paired_recall_targets(tmp_path):
    """The probe's slope is taken against its steps; the interval over seeds and the paired [RET] recall
    differences decide the RL targets (hand-computed)."""
    before = recall_summary(_results(tmp_path / "a" / "results.json", [0.0, 0.25]))  # r1 0.125, r5 0.375
    after = recall_summary(_results(tmp_path / "b" / "results.json", [0.25, 0.25]))  # r1 0.25, r5 0.75

    def run(k, probe, final=after):
        steps = [0, 5, 10]
        return {
            "eval": {"before_rl-ret": before, "final-ret": final},
            "rl": {"reward": [0.1, 0.2], "slope": 0.1},
            "probe": {
                "step": steps,
                "reward": probe,
                "top1": [0.1, 0.2, 0.3],
                "slope": slope(probe, steps),
                "slopes": {"reward": slope(probe, steps), "top1": 0.02},
            },
        }

    runs = [run(k, [0.1 + k, 0.15 + k, 0.2 + k]) for k in range(3)]  # slope 0.01 per step on every seed
    assert runs[0]["probe"]["slope"] == pytest.approx(0.01)
    agg = aggregate(runs)
    assert agg["probe_slope"]["mean"] == pytest.approx(0.01) and agg["probe_slope"]["excludes_zero"]
    assert agg["probe_curve"]["step"] == [0, 5, 10] and agg["probe_curve"]["mean"] == pytest.approx([1.1, 1.15, 1.2])
    t = targets(agg)
    assert t["rl_probe_reward_slope"]["met"]
    assert t["rl_ret_r1_gain"]["mean"] == pytest.approx(0.125) and t["rl_ret_r1_gain"]["met"]
    assert t["rl_ret_r5_gain"]["mean"] == pytest.approx(0.375) and t["rl_ret_r5_gain"]["met"]
    mixed = aggregate([run(k, [0.2, 0.1 + 0.2 * (k % 2), 0.2], final=before) for k in range(3)])
    assert not targets(mixed)["rl_probe_reward_slope"]["met"]
    assert not targets(mixed)["rl_ret_r1_gain"]["met"]  # unchanged recall is no gain
    from elva_jax.report.learning import markdown

    text = markdown({"config": "c.yaml", "machine": {}, "targets": t, "variants": {
        "main": {"seeds": [0, 1, 2], "overrides": [], "aggregate": agg}}})  # fmt: skip
    assert "| final-ret | 25.0" in text and "Probe (held-out instances" in text
    assert "| reward | 1.1000 | 1.2000 | 1.00e-02 |" in text and "| top1 | 0.1000 | 0.3000 | 2.00e-02 |" in text


def test_embed_rl_probe_targets_and_the_equal_compute_table(tmp_path):
    """Embed-RL's probe logs format / ORM: their slopes over the seeds decide its targets (hand-made runs
    in the shape `collect` returns); another variant's final recall sits beside the main one's."""
    from elva_jax.report.learning import collect, markdown

    d = tmp_path / "run"
    (d / "rl").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"wall_s": 10.0, "export": "x"}))
    rows = [{"step": 0, "probe_reward": 0.1, "probe_format": 0.2, "probe_orm": 0.01, "probe_s": 3.0}]
    rows += [{"step": 1, "reward": 0.3, "format": 0.5, "orm": 0.02, "cot_len": 9.0}]
    rows += [{"step": 2, "probe_reward": 0.3, "probe_format": 0.6, "probe_orm": 0.03, "probe_s": 3.0}]
    (d / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "metrics.jsonl").write_text(
        '{"step": 0, "compile_s": 1.0}\n{"step": 10, "loss": 2.5}\n{"step": 20, "loss": 2.0}\n'
    )
    c = collect(d)
    assert c["loss_curve"] == {"step": [10, 20], "loss": [2.5, 2.0]} and c["loss"] == []  # a resumed, finished run
    assert c["probe"]["slopes"] == pytest.approx({"reward": 0.1, "format": 0.2, "orm": 0.01})
    assert c["rl"]["format"] == [0.5] and c["rl"]["orm"] == [0.02] and "margin" not in c["rl"]
    runs = [{**c, "probe": {**c["probe"], "slopes": {"format": 0.2 + k / 100, "orm": (-1) ** k}}} for k in range(3)]
    t = targets(aggregate(runs))
    assert t["embed_rl_probe_format_slope"]["met"] and not t["embed_rl_probe_orm_slope"]["met"]
    after = recall_summary(_results(tmp_path / "b" / "results.json", [0.25, 0.25]))
    variant = lambda: {"seeds": [0], "overrides": [], "runs": [{"wall_s": 5.0, "wall_s_measured": 0.0}],  # noqa: E731
                       "aggregate": aggregate([{"eval": {"final-ret": after}, "rl": {"slope": math.nan}}])}  # fmt: skip
    text = markdown({"config": "c.yaml", "machine": {}, "targets": t,
                     "variants": {"main": variant(), "more_contrastive": variant()}})  # fmt: skip
    assert "| more_contrastive | ret | 25.0 | 75.0 |" in text and "| main | ret | 25.0 | 75.0 |" in text


def test_learning_curves_png(tmp_path):
    s = recall_summary(_results(tmp_path / "a" / "results.json", [0.1, 0.2]))
    run = {
        "seed": 0,
        "loss": list(np.linspace(3, 1, 50)),
        "rl": {k: list(np.linspace(0.2, 0.3, 10)) for k in ("reward", "margin", "ranking")},
        "probe": {"step": [0, 5, 10], "reward": [0.2, 0.25, 0.3], "top1": [0.1, 0.2, 0.2], "slope": 0.01},
        "eval": {"start-eol": s, "before_rl-eol": s, "final-ret": s},
    }
    run["rl"]["slope"] = slope(run["rl"]["reward"])
    report = {"chance_loss": math.log(16), "variants": {}}
    for name in ("main", "soft_rank"):
        report["variants"][name] = {"runs": [run, {**run, "seed": 1}], "aggregate": aggregate([run, run])}
    learning_curves(report, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (1120, 660)


def test_bundled_sizes_are_checked(tmp_path):
    root = ensure_generated(tmp_path / "b", n_train=2, n_test=1)
    before = sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file())
    assert ensure_generated(root, n_train=2, n_test=1) == root  # reused as it is
    with pytest.raises(BundledSizeError, match="2 train / 1 test scenes, the run asks for 3 / 1"):
        ensure_generated(root, n_train=3, n_test=1)
    assert sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()) == before  # nothing rewritten


def test_only_a_completed_run_counts_as_finished(tmp_path):
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"losses": [1.0], "end_step": 1}))  # the contrastive loop's
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 1.0, "export": "x", "stopped": {"stage": "RL"}}))
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 1.0, "export": "x"}))
    assert finished(tmp_path)


def test_learning_curves_png_of_an_embed_rl_run(tmp_path):
    """No contrastive stage and no evaluation: the warm start's loss and the probe's rates are drawn."""
    run = {
        "seed": 0,
        "loss": [],
        "loss_curve": {"step": [], "loss": []},
        "sft": {"step": [10, 20, 30], "loss": [3.0, 2.0, 1.5]},
        "rl": {"reward": list(np.linspace(0.04, 0.05, 10)), "format": list(np.linspace(0.7, 0.9, 10))},
        "probe": {"step": [0, 5], "reward": [0.04, 0.05], "format": [0.7, 0.9], "acc": [0.3, 0.3], "slope": 0.002},
        "eval": {},
    }
    run["rl"]["slope"] = slope(run["rl"]["reward"])
    report = {"chance_loss": math.log(16), "variants": {"main": {"runs": [run], "aggregate": aggregate([run])}}}
    learning_curves(report, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (1120, 660)
