"""The README's main command: the tiny default run end to end, and clear config errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from elva_jax.train.stages import main


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path, capsys):
    # the final EOL evaluation is left out here: the eval runner's tests and the Qwen3-VL run cover it
    main(
        [
            f"run.dir={tmp_path}",
            "train.max_steps=4",
            "run.checkpoint_every=2",
            "rl.steps=2",
            "eval.summary_tokens=4",
            "train.eval_modes=[ret]",
        ]
    )
    out = capsys.readouterr().out
    assert "exported transformers checkpoint" in out
    s = json.load(open(tmp_path / "summary.json"))
    assert s["end_step"] == 4 and len(s["losses"]) == 4 and np.isfinite(s["losses"]).all()
    assert s["records"] == 160 and s["pipeline"]["images"] > 0
    assert os.path.exists(tmp_path / "export" / "model.safetensors")
    # the export records the RL stage, so `python -m elva_jax.eval` defaults to the [RET] embedding
    assert json.load(open(tmp_path / "export" / "elva_export.json"))["embedding"] == "ret"
    assert os.path.exists(tmp_path / "config.yaml")
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "4"
    assert s["rl"]["steps"] == 2 and len(s["rl"]["reward"]) == 2
    assert set(s["rl"]["phase_s"]) == {"time_rollout_s", "time_reforward_s", "time_reward_s", "time_update_s"}
    rl_lines = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert {"reward_margin", "reward_ranking", "kl_mean", "clip", "zero_variance_groups"} <= set(rl_lines[0])
    # evaluation of the final model (both embeddings) and of the model before RL, with the three reports
    for d in ("final-ret", "before_rl-ret"):
        for f in ("results.json", "results.md", "recall.png"):
            assert os.path.exists(tmp_path / "eval" / d / f), (d, f)
    res = json.load(open(tmp_path / "eval" / "final-ret" / "results.json"))
    assert res["settings"]["mode"] == "ret" and "grain_masking" in res
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert any("compile_s" in r for r in lines) and any("tokens_per_s" in r for r in lines)


@pytest.mark.slow
def test_default_run_on_a_tiny_qwen3_vl_with_mined_negatives(tmp_path, capsys):
    """Every stage on another family: contrastive, negatives mined with the trained model, RL, export (a
    Qwen3-VL directory) and eval."""
    main(
        [
            "--config",
            os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_qwen3_vl.yaml"),
            f"run.dir={tmp_path}",
            "train.max_steps=2",
            "run.checkpoint_every=2",
            "rl.steps=1",
            "rl.negatives=mined",
            "rl.query_fraction=0.1",
            "rl.num_hard_negatives=2",
            "rl.num_random_negatives=2",
            "train.eval_modes=[eol]",
            "train.eval_at_start=true",
            "eval.grain_masking=false",
        ]
    )
    out = capsys.readouterr().out
    assert "RL negatives:" in out and "of 1 positive + 4 negatives" in out
    assert "false negatives dropped per query mean" in out
    neg = json.load(open(tmp_path / "rl" / "negatives" / "negatives.json"))
    assert len(neg["negatives"]) == 16 and all(len(v) <= 4 for v in neg["negatives"].values())
    assert len(neg["stats"]["dropped_per_query"]) == 16
    s = json.load(open(tmp_path / "summary.json"))
    assert s["rl"]["negatives"]["queries"] == 16 and s["rl"]["negatives"]["filter"] == "absolute"
    assert s["rl"]["negatives"]["false_negatives_dropped"] == sum(neg["stats"]["dropped_per_query"])
    assert s["end_step"] == 2 and np.isfinite(s["losses"]).all() and s["pipeline"]["images"] > 0
    # the learning curve's three points in the evaluated mode: the start, before RL, after it (compared)
    assert {"eval_start_eol", "eval_before_rl_eol", "eval_eol"} <= set(s)
    final = json.load(open(tmp_path / "eval" / "final-eol" / "results.json"))
    assert final["compare_to"] and final["compare_to"].endswith(os.path.join("before_rl-eol", "results.json"))
    assert s["rl"]["steps"] == 1 and np.isfinite(s["rl"]["reward"]).all()
    assert json.load(open(tmp_path / "export" / "config.json"))["model_type"] == "qwen3_vl"
    assert os.path.exists(tmp_path / "eval" / "final-eol" / "results.json")


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="did you mean 'dir'"):
        main([f"run.dri={tmp_path}"])


def test_batch_not_divisible_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="not divisible by train.micro_batches"):
        main([f"run.dir={tmp_path}", "train.global_batch=6", "train.micro_batches=4"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("train.tau=0", "train.tau"),
        ("rl.temperature=0", "rl.temperature"),
        ("train.micro_batches=0", "train.micro_batches"),
        ("data.seq_buckets=[]", "data.seq_buckets"),
        ("run.checkpoint_every=0", "run.checkpoint_every"),
        ("train.max_steps=-1", "train.max_steps"),
        ("train.global_batch=0", "train.global_batch"),
        ("data.max_skip_fraction=2", "data.max_skip_fraction"),
        ("rl.query_fraction=0", "rl.query_fraction"),
        ("rl.adv_ddof=8", "rl.adv_ddof"),
        ("rl.gamma=.inf", "rl.gamma"),
        ("rl.probe_instances=3", "rl.probe_instances"),  # not a multiple of rl.instances_per_step 2
        ("rl.probe_every=0", "rl.probe_every"),
        ("sft.steps=0", "sft.steps"),
        ("sft.lr=-1", "sft.lr"),
        ("sft.max_target_tokens=1", "sft.max_target_tokens"),
        ("train.stages=[rl,sft]", "train.stages"),  # out of order
        ("train.stages=[sft,sft]", "train.stages"),
        ("train.stages=[warmup]", "train.stages"),
    ],
)
def test_impossible_values_are_refused_up_front(tmp_path, override, field):
    with pytest.raises(SystemExit, match=f"config error: .*{field}"):
        main([f"run.dir={tmp_path}", override])
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing started


def test_global_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(Exception, match="train.global_batch 400 exceeds the 160 training records"):
        main([f"run.dir={tmp_path}", "train.global_batch=400"])


def test_known_errors_end_in_one_line_without_a_traceback(tmp_path):
    """The command line: a known error class is one line on stderr and exit status 2; --debug shows it."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "elva_jax.train", f"run.dir={tmp_path}", "optim.lr=-1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "optim.lr" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "elva_jax.compare", "--hf-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "elva_jax.compare", "--debug", "--hf-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.slow
def test_an_incompatible_resume_stops_and_keeps_every_checkpoint(tmp_path):
    from elva_jax.runtime.checkpointing import CheckpointIncompatible

    base = [f"run.dir={tmp_path}", "train.stages=[contrastive]", "train.eval_modes=[]", "run.checkpoint_every=1"]
    main([*base, "train.max_steps=2", "run.async_checkpoint=false"])
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(CheckpointIncompatible, match="lora.rank: checkpoint 16, now 8"):
        main([*base, "train.max_steps=3", "lora.rank=8"])
    with pytest.raises(CheckpointIncompatible, match="train.global_batch: checkpoint 8, now 4"):
        main([*base, "train.max_steps=3", "train.global_batch=4"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # nothing rotated away or overwritten


@pytest.mark.slow
def test_rerunning_a_finished_run_resumes_at_its_end(tmp_path, capsys):
    base = [f"run.dir={tmp_path}", "train.stages=[contrastive]", "train.eval_modes=[]", "train.max_steps=2"]
    main([*base, "run.async_checkpoint=false"])
    capsys.readouterr()
    main(base)  # every stage already complete: nothing trains, the summary still prints
    out = capsys.readouterr().out
    assert "contrastive: complete at step 2 (resumed from its checkpoint)" in out and "done in" in out


def test_a_missing_data_root_or_file_names_the_field(tmp_path):
    from elva_jax.configlib import ConfigError

    over = [f"run.dir={tmp_path}", "data.kind=mbeir", "data.train_files=[q.jsonl]", "data.pool_file=pool.jsonl"]
    with pytest.raises(ConfigError, match="data.train_files: .*q.jsonl: data.root does not exist"):
        main([*over, f"data.root={tmp_path / 'nowhere'}"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "q.jsonl").write_text("")
    with pytest.raises(ConfigError, match="data.pool_file: .*pool.jsonl: no such file"):
        main([*over, f"data.root={tmp_path / 'd'}"])
