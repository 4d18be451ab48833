"""The embedding-convention registry: each convention pools the hidden state a hand-built row says it should,
and the schema's choices are the registry's."""

from __future__ import annotations

import numpy as np
import pytest

from elva_jax import configlib
from elva_jax.data.conventions import CONVENTIONS, EVALUATED, MINING, TRAINABLE, convention
from elva_jax.data.prompts import instruct_prompt, qwen3_embedding_instruction
from elva_jax.model.tiny import RANDOM_PRESETS, preset_for_checkpoint_name, preset_names
from elva_jax.schema import RunConfig

EMB, RET, PAD = 7, 9, 0
# row 0: tokens 1 2 EMB 3 RET 4 then padding; row 1: 5 RET 6 EMB 8, no padding
IDS = np.array([[1, 2, EMB, 3, RET, 4, PAD], [5, RET, 6, EMB, 8, 2, 3]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
# where each convention reads, by hand: before the last <emb>, the last real token, the last [RET], the last <emb>
EXPECTED = {"eol": [1, 2], "last": [5, 6], "instruct_last": [5, 6], "ret": [4, 1], "tcot": [2, 3]}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_each_convention_pools_the_state_it_names(name):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 7, 4)).astype(np.float32)
    got = np.asarray(convention(name).pool(hidden, IDS, MASK, emb_token_id=EMB, ret_token_id=RET))
    want = hidden[np.arange(2), EXPECTED[name]]
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_registry_facts_and_the_schema_choices():
    assert convention("ret").generates and not any(CONVENTIONS[n].generates for n in MINING)
    assert convention("instruct_last").instruction == "system" and convention("eol").instruction == "user"
    assert set(TRAINABLE) == {"eol", "last", "instruct_last"} and set(EVALUATED) <= set(CONVENTIONS)
    with pytest.raises(ValueError, match="unknown embedding convention"):
        convention("cls")
    with pytest.raises(configlib.ConfigError, match="train.embedding"):
        configlib.load(RunConfig, None, ["train.embedding=ret"])  # [RET] is read after generation: RL's, not trained
    assert configlib.load(RunConfig, None, ["rl.mining_embedding=instruct_last"]).rl.mining_embedding == "instruct_last"


def test_random_presets_and_checkpoint_names():
    assert set(RANDOM_PRESETS) <= set(preset_names())
    assert preset_for_checkpoint_name("Qwen/Qwen2-VL-7B-Instruct") == ("qwen2vl_7b", "Qwen2-VL-7B")
    assert preset_for_checkpoint_name("/ckpt/Qwen3-VL-Embedding-8B") == ("qwen3vl_8b", "Qwen3-VL-8B")
    assert preset_for_checkpoint_name("runs/qwen2vl_2b_nli/export") == ("qwen2vl_2b", "Qwen2-VL-2B")
    assert preset_for_checkpoint_name("runs/my_model/export") is None
    assert preset_for_checkpoint_name("Qwen/Qwen3-VL-7B") is None  # no such Qwen3-VL size


@pytest.mark.parametrize(
    "given, written",
    [
        ("Find the image", "Find the image."),
        ("  Find the matching caption  \n", "Find the matching caption."),
        ("Which image matches?", "Which image matches?"),
        ("Retrieve:", "Retrieve:"),  # ':' is punctuation (Po)
        ("找到对应的图片。", "找到对应的图片。"),  # the ideographic full stop is punctuation too
        ("Match the caption (short)", "Match the caption (short)"),  # ')' is punctuation (Pe)
        ("Find 2 cats", "Find 2 cats."),
        ("Find a cat $", "Find a cat $."),  # '$' is a symbol (Sc), not punctuation
        ("   ", None),
        ("", None),
        (None, None),
    ],
)
def test_qwen3_embedding_instruction_follows_the_official_rule(given, written):
    """Transcribed from the official code: strip; append "." unless the last character's Unicode category is P*;
    nothing left means no instruction (the default one is used as given)."""
    assert qwen3_embedding_instruction(given) == written


def test_the_instruct_last_system_turn_uses_the_rule_and_keeps_the_default_as_given():
    sys_text = lambda p: p.messages[0]["content"][0]["text"]  # noqa: E731
    assert sys_text(instruct_prompt("a cat", 0, "Find the image")) == "Find the image."
    assert sys_text(instruct_prompt("a cat", 0, "  ", default_instruction="Represent it")) == "Represent it"
    assert sys_text(instruct_prompt("a cat", 0, None)) == "Represent the user's input."
