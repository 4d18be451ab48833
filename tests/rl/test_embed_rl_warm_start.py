"""The Embed-RL reasoner's warm start (`elva_jax.rl.warm_start` with `reasoner_target`): after the reasoner's own
T-CoT prompt, the loss falls and the reasoner writes T-CoTs that pass the official format regex, greedy and
sampled, while a model taught the same summaries with the tags stripped does not; the tags enter a restricted
generation vocabulary; impossible settings are refused by name."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from elva_jax import configlib
from elva_jax.configlib import ConfigError
from elva_jax.data.benchmarks.multigrain.generator import generate as generate_data
from elva_jax.data.benchmarks.multigrain.scenes import COLOURS, SHAPES, SIZES
from elva_jax.data.records import ContrastiveRecords
from elva_jax.data.sources import open_source
from elva_jax.data.summaries import SummaryRecords
from elva_jax.data.tables import concat
from elva_jax.data.tokenize import Tokenizer, generation_vocab
from elva_jax.model.hf_checkpoint import resize_vocab
from elva_jax.model.params import init_params
from elva_jax.model.sampler import SamplerConfig, generate
from elva_jax.model.tiny import preset_config
from elva_jax.rl.trainer import encode_prompts, model_inputs
from elva_jax.rl.warm_start import SFTBatches, reasoner_options, reasoner_target, run_sft, sft_recipe
from elva_jax.runtime.models import model_options
from elva_jax.schema import RunConfig

OFFICIAL = re.compile(r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>", re.DOTALL)
WORDS = (*COLOURS, *SHAPES, *SIZES, "top", "bottom", "left", "right", "center")
# a quick lesson: one summary; "\n" makes the end token differ from a tag's ">"
HONEST = "<thinking>{summary}</thinking><rethink></rethink><answer></answer>\n"
STRIPPED = "{summary}"  # the same summaries, no tags
STEPS = 60


def _cfg(run_dir, **kw):
    over = {
        "run.dir": str(run_dir),
        "run.async_checkpoint": "false",
        "run.checkpoint_every": "1000",
        "run.log_every": "25",
        "rl.recipe": "embed_rl",
        "train.stages": "[sft, rl]",
        "sft.steps": str(STEPS),
        "sft.batch": "8",
        "sft.lr": "5e-3",
        "sft.ret_contrastive_weight": "0",
        "sft.max_target_tokens": "40",
        "sft.target_template": json.dumps(HONEST),
        "rl.prompt_buckets": "[192]",
        "data.patch_row_len": "64",
        "optim.warmup_ratio": "0.05",
        "model.generation_words": "[" + ",".join(WORDS) + "]",
        **kw,
    }
    return configlib.load(RunConfig, None, [f"{k}={v}" for k, v in over.items()])


def _short_text_pairs(base, max_objects: int = 2) -> SummaryRecords:
    """The text-only (query, positive) pairs of ``base`` with at most ``max_objects`` objects (short targets: a
    quick lesson), each side with two of its summary variants."""
    recs = SummaryRecords(base)
    keep = [
        i
        for i in range(len(recs))
        if all(s["image"] is None for s in recs[i]["sides"])
        and all(t[0].count(",") < max_objects for t in recs.targets[i])
    ]
    recs.entries = [recs.entries[i] for i in keep]
    recs.targets = [(tq[:2], tp[:2]) for tq, tp in (recs.targets[i] for i in keep)]
    return recs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mg")
    generate_data(root, seed=0, n_train=48, n_test=8)
    src = open_source(str(root), "files")
    instr = src.instructions("instructions/query_instructions.tsv")
    pool = src.pool("cand_pool/global/mbeir_multigrain_union_train_cand_pool.jsonl")
    queries = concat([src.queries("query/train/mbeir_multigrain_union_train.jsonl")])
    train = _short_text_pairs(ContrastiveRecords(queries, pool, src.image_root, instructions=instr))
    tok = Tokenizer.from_dir()
    mcfg = preset_config("tiny")
    params, mcfg = resize_vocab(init_params(mcfg, jax.random.key(0)), mcfg, tok.vocab_size)
    return train, tok, mcfg, params


def _texts(params, mcfg, opts, tok, cfg, sides, *, greedy: bool) -> list[str]:
    """The reasoner's decoded outputs for ``sides`` (its T-CoT prompt; stop <|im_end|>)."""
    enc, _ = sft_recipe(cfg, tok)
    ids, am, pvs, grids = encode_prompts(
        sides, enc, min_pixels=3136, max_pixels=235200, buckets=(192,), pad_id=tok.pad_token_id,
        geometry=mcfg.vision.geometry,
    )  # fmt: skip
    x = model_inputs(mcfg, opts, ids, am, pvs, grids, cfg.data.patch_row_len)
    scfg = SamplerConfig(max_new_tokens=cfg.sft.max_target_tokens, top_k=1 if greedy else 0, cache_dtype="float32")
    eos = tok.ids("<|im_end|>")[0]
    out = generate(
        params, x, jax.random.key(3), mcfg, opts, scfg, num_samples=1, stop_ids=(eos,), ret_id=eos,
        pad_id=tok.pad_token_id,
    )  # fmt: skip
    return [tok.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(np.asarray(out.tokens), out.lengths)]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    train, tok, mcfg, params = world
    out = {}
    for name, template in (("honest", HONEST), ("stripped", STRIPPED)):
        d = tmp_path_factory.mktemp(name)
        cfg = _cfg(d, **{"sft.target_template": json.dumps(template)})
        opts = reasoner_options(cfg, tok, model_options(cfg))
        out[name] = (cfg, opts, run_sft(cfg, mcfg, params, train, tok, opts, run_dir=str(d)))
    return out


def test_warm_start_teaches_the_t_cot_format_and_stripped_tags_do_not(world, trained):
    train, tok, mcfg, _ = world
    cfg, opts, honest = trained["honest"]
    assert honest["steps"] == STEPS and not honest["stopped"]
    first, last = np.mean(honest["losses"][:5]), np.mean(honest["losses"][-5:])
    assert last < 0.5 * first, (first, last)
    sides = [train[i]["sides"][s] for i in range(16) for s in (0, 1)]
    rates = {}
    for name, (c, o, res) in trained.items():
        for greedy in (True, False):
            texts = _texts(res["params"], mcfg, o, tok, c, sides, greedy=greedy)
            rates[name, greedy] = float(np.mean([OFFICIAL.search(t) is not None for t in texts]))
    print(f"loss {first:.3f} -> {last:.3f}; official-format rate (greedy, sampled): {rates}")
    # a 2-layer model after 60 steps: greedy mostly right, sampling sometimes; the stripped targets never
    assert rates["honest", True] >= 0.5 and rates["honest", False] >= 0.05, rates
    assert rates["stripped", True] == 0.0 and rates["stripped", False] <= 0.05, rates


def test_reasoner_targets_are_its_template_then_im_end(world, trained):
    train, tok, mcfg, _ = world
    full = "<thinking>{summary}</thinking><rethink>{alt}</rethink><answer>{summary}</answer>"  # the preset's
    cfg = _cfg(trained["honest"][0].run.dir, **{"sft.target_template": json.dumps(full), "sft.max_target_tokens": "96"})
    opts = reasoner_options(cfg, tok, model_options(cfg))
    b = SFTBatches(train, sft_recipe(cfg, tok)[0], tok, mcfg, opts, cfg, reasoner_target(tok, full))
    batch = b(0)
    eos = tok.ids("<|im_end|>")[0]
    for t, n in zip(batch["targets"], batch["lengths"], strict=True):
        assert t[n - 1] == eos and not t[n:].any()
        text = tok.decode(t[: n - 1].tolist())
        m = re.fullmatch(r"<thinking>(.*)</thinking><rethink>(.*)</rethink><answer>(.*)</answer>", text)
        assert m and m.group(1) == m.group(3) and m.group(2) and OFFICIAL.search(text)
    # the reasoner's prompt, not ELVA's [RET] prompt
    assert "[RET]" not in tok.decode(np.asarray(batch["prompts"]["input_ids"][0]).tolist())
    # the tags' tokens are in the restricted vocabulary (not in ELVA's, which is unchanged)
    elva_vocab = generation_vocab(tok, WORDS)
    assert model_options(cfg, tok).vocab == elva_vocab and set(opts.vocab) > set(elva_vocab)
    assert {i for tag in ("<thinking>", "</rethink>", "<answer>") for i in tok.ids(tag)} <= set(opts.vocab)


def test_refusals_name_the_field(world, tmp_path):
    train, tok, mcfg, params = world
    with pytest.raises(ConfigError, match="sft.ret_contrastive_weight"):
        _cfg(tmp_path, **{"sft.ret_contrastive_weight": "0.5"})
    for bad in ("no field", "{summary} {other}", "{summary"):
        with pytest.raises(ConfigError, match="sft.target_template"):
            _cfg(tmp_path, **{"sft.target_template": json.dumps(bad)})
    cfg = _cfg(tmp_path, **{"model.generation_words": "[red, circle]"})  # summaries the vocabulary cannot write
    with pytest.raises(ConfigError, match="outside the generation vocabulary"):
        SFTBatches(train, sft_recipe(cfg, tok)[0], tok, mcfg, reasoner_options(cfg, tok, model_options(cfg)), cfg,
                   reasoner_target(tok, HONEST))  # fmt: skip
    with pytest.raises(ConfigError, match="raise sft.max_target_tokens"):
        c = _cfg(tmp_path, **{"sft.max_target_tokens": "8"})
        run_sft(c, mcfg, params, train, tok, reasoner_options(c, tok, model_options(c)), run_dir=str(tmp_path))
    # ELVA's warm start with InfoNCE stays allowed; a reasoner spec with InfoNCE weight is refused at run_sft
    elva = _cfg(tmp_path, **{"rl.recipe": "elva", "sft.ret_contrastive_weight": "1"})
    with pytest.raises(ConfigError, match="sft.ret_contrastive_weight"):
        run_sft(elva, mcfg, params, train, tok, model_options(elva, tok), run_dir=str(tmp_path),
                spec=reasoner_target(tok, HONEST))  # fmt: skip
