"""The summary warm start (`elva_jax.rl.warm_start`): the loss falls, greedy summaries of held-out sides name
their scene's grains far above what a model taught sabotaged targets (every side given another side's
summary) names, and an interrupted run resumes to the same end."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from elva_jax import configlib
from elva_jax.configlib import ConfigError
from elva_jax.data.benchmarks.multigrain.generator import generate as generate_data
from elva_jax.data.benchmarks.multigrain.scenes import COLOURS, SHAPES, SIZES
from elva_jax.data.encoding import PromptEncoder
from elva_jax.data.records import ContrastiveRecords
from elva_jax.data.sources import open_source
from elva_jax.data.summaries import SummaryRecords
from elva_jax.data.tokenize import Tokenizer
from elva_jax.model.hf_checkpoint import resize_vocab
from elva_jax.model.params import init_params
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.model.tiny import preset_config
from elva_jax.rl.trainer import encode_prompts, model_inputs
from elva_jax.rl.warm_start import run_sft
from elva_jax.runtime.models import model_options
from elva_jax.schema import RunConfig

WORDS = (*COLOURS, *SHAPES, *SIZES, "top", "bottom", "left", "right", "center")
STEPS = 400


def _cfg(run_dir, **kw):
    over = {
        "run.dir": str(run_dir),
        "run.async_checkpoint": "false",
        "run.checkpoint_every": "1000",
        "run.log_every": "20",
        "sft.steps": str(STEPS),
        "sft.batch": "8",
        "rl.prompt_buckets": "[128]",
        "sft.lr": "3e-3",
        "data.patch_row_len": "64",  # patch slots per row: the text-only rows carry no image
        "optim.warmup_ratio": "0.05",
        "model.generation_words": "[" + ",".join(WORDS) + "]",
        **kw,
    }
    return configlib.load(RunConfig, None, [f"{k}={v}" for k, v in over.items()])


def _text_pairs(base) -> SummaryRecords:
    """The (query, positive) pairs of ``base`` whose sides are both text (paraphrase -> caption), with their
    canonical summaries: the grains are in the prompt to read (a quick lesson for a CI test)."""
    recs = SummaryRecords(base)
    keep = [i for i in range(len(recs)) if all(s["image"] is None for s in recs[i]["sides"])]
    recs.entries = [recs.entries[i] for i in keep]
    recs.targets = [(tq[:1], tp[:1]) for tq, tp in (recs.targets[i] for i in keep)]  # the canonical ones
    return recs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mg")
    generate_data(root, seed=0, n_train=48, n_test=8)
    src = open_source(str(root), "files")
    instr = src.instructions("instructions/query_instructions.tsv")

    def base(split, files):
        pool = src.pool(f"cand_pool/global/mbeir_multigrain_union_{split}_cand_pool.jsonl")
        from elva_jax.data.tables import concat

        return ContrastiveRecords(concat([src.queries(f) for f in files]), pool, src.image_root, instructions=instr)

    train = _text_pairs(base("train", ["query/train/mbeir_multigrain_union_train.jsonl"]))
    test = _text_pairs(base("test", ["query/test/mbeir_multigrain_task1_test.jsonl"]))
    tok = Tokenizer.from_dir()
    mcfg = preset_config("tiny")
    params = init_params(mcfg, jax.random.key(0))
    params, mcfg = resize_vocab(params, mcfg, tok.vocab_size)
    scenes = {s["scene_id"]: s for s in map(json.loads, open(root / "meta" / "scenes.jsonl"))}
    return train, test, tok, mcfg, params, scenes, src


def _grain_hits(params, mcfg, opts, tok, test, cfg) -> float:
    """Share of the held-out sides' grain words (each object's size, colour, shape) that their greedy
    summary names (both sides of each test pair)."""
    enc = PromptEncoder(tok, "ret", generation=True)
    hits = []
    sides = [(p["sides"][k], p["targets"][k][0]) for p in (test[i] for i in range(len(test))) for k in (0, 1)]
    for b in range(0, len(sides), 16):
        recs = sides[b : b + 16]
        ids, am, pvs, grids = encode_prompts(
            [side for side, _ in recs], enc, min_pixels=3136, max_pixels=235200, buckets=(128,),
            pad_id=tok.pad_token_id, geometry=mcfg.vision.geometry,
        )  # fmt: skip
        x = model_inputs(mcfg, opts, ids, am, pvs, grids, cfg.data.patch_row_len)
        scfg = SamplerConfig(max_new_tokens=cfg.sft.max_target_tokens, top_k=1, cache_dtype="float32")
        eos = tok.ids("<|im_end|>")[0]
        out = generate(
            params, x, jax.random.key(0), mcfg, opts, scfg, num_samples=1, stop_ids=(tok.ret_token_id, eos),
            ret_id=tok.ret_token_id, pad_id=tok.pad_token_id,
        )  # fmt: skip
        for (_, target), t, n in zip(recs, np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
            said = set(tok.decode(t[:n]).replace(",", " ").split())
            truth = [w for obj in target.split(", ") for w in obj.split()[:3]]  # size colour shape
            hits += [w in said for w in truth]
    return float(np.mean(hits))


def _heldout_nll(params, mcfg, opts, tok, test, cfg) -> float:
    """Mean per-token NLL of the held-out sides' canonical summaries (+ [RET]), teacher-forced."""
    from elva_jax.rl.warm_start import SFTBatches, sft_loss

    b = SFTBatches(test, PromptEncoder(tok, "ret", generation=True), tok, mcfg, opts, cfg)
    b.order = [list(range(len(test)))]
    _, m = sft_loss(params, params, b(0), cfg=mcfg, opts=opts, lora_scale=1.0, full=True, ret_weight=0.0, tau=0.05)
    return float(m["nll"])


@pytest.mark.slow
def test_warm_start_teaches_the_grains_and_sabotage_does_not(world, tmp_path):
    train, test, tok, mcfg, params, _, _ = world
    cfg = _cfg(tmp_path / "honest")
    opts = model_options(cfg, tok)
    assert opts.vocab and tok.ret_token_id in opts.vocab
    honest = run_sft(cfg, mcfg, params, train, tok, opts, run_dir=str(tmp_path / "honest"))
    assert honest["steps"] == STEPS and not honest["stopped"]
    first, last = np.mean(honest["losses"][:5]), np.mean(honest["losses"][-5:])
    # sabotage: every pair is taught the summaries of another pair (a fixed derangement), so the prompt says
    # nothing about its target; the model can learn the summaries' form but not the input's grains
    bad = _text_pairs(train.base)
    perm = np.roll(np.arange(len(bad.targets)), 7)
    bad.targets = [bad.targets[j] for j in perm]
    sabotaged = run_sft(_cfg(tmp_path / "bad"), mcfg, params, bad, tok, opts, run_dir=str(tmp_path / "bad"))
    nll_h = _heldout_nll(honest["params"], mcfg, opts, tok, test, cfg)
    nll_s = _heldout_nll(sabotaged["params"], mcfg, opts, tok, test, cfg)
    h = _grain_hits(honest["params"], mcfg, opts, tok, test, cfg)
    s = _grain_hits(sabotaged["params"], mcfg, opts, tok, test, cfg)
    print(
        f"loss {first:.3f} -> {last:.3f}; held-out NLL honest {nll_h:.3f} sabotaged {nll_s:.3f}; "
        f"grain words {h:.2f} vs {s:.2f}"
    )
    assert last < 0.7 * first, (first, last)
    assert nll_h < nll_s - 0.2, (nll_h, nll_s)
    assert h > s + 0.15 and h > 0.6, (h, s)


@pytest.mark.slow
def test_resume_continues_to_the_same_end(world, tmp_path):
    train, _, tok, mcfg, params, _, _ = world
    kw = {"sft.steps": "6", "run.checkpoint_every": "3"}
    opts = model_options(_cfg(tmp_path / "a", **kw), tok)
    full = run_sft(_cfg(tmp_path / "a", **kw), mcfg, params, train, tok, opts, run_dir=str(tmp_path / "a"))
    part = run_sft(_cfg(tmp_path / "b", **kw, **{"run.stop_after_steps": "3"}), mcfg, params, train, tok, opts,
                   run_dir=str(tmp_path / "b"))  # fmt: skip
    assert part["stopped"] and part["steps"] == 3
    rest = run_sft(_cfg(tmp_path / "b", **kw), mcfg, params, train, tok, opts, run_dir=str(tmp_path / "b"))
    assert rest["steps"] == 6 and not rest["stopped"]
    np.testing.assert_allclose(part["losses"] + rest["losses"], full["losses"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(rest["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert os.path.isfile(tmp_path / "a" / "metrics.jsonl")


def test_targets_the_vocabulary_cannot_write_are_refused_by_name(world, tmp_path):
    train, _, tok, mcfg, params, _, _ = world
    cfg = _cfg(tmp_path, **{"model.generation_words": "[red, circle]"})
    with pytest.raises(ConfigError, match="outside the generation vocabulary"):
        run_sft(cfg, mcfg, params, train, tok, model_options(cfg, tok), run_dir=str(tmp_path))
    cfg = _cfg(tmp_path, **{"sft.max_target_tokens": "3"})
    with pytest.raises(ConfigError, match="raise sft.max_target_tokens"):
        run_sft(cfg, mcfg, params, train, tok, model_options(cfg, tok), run_dir=str(tmp_path))
