"""Prompts: LamRA / ELVA templates against hand-written strings and transformers' chat-template rendering."""

from __future__ import annotations

import zlib

import pytest

from elva_jax.data import prompts as P
from elva_jax.data.tokenize import default_tokenizer_dir

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
ELVA = (
    "\nAnalyze and summarize the key information of the above input. "
    "Finally, append the special token [RET] to represent the entire input."
)

# (prompt, hand-written rendering)
CASES = {
    "lamra_text_query": (
        P.lamra_prompt("a dog running on grass", instruction="Find a caption for this description:"),
        SYS + "<|im_start|>user\nFind a caption for this description: a dog running on grass."
        "\nSummarize above sentence in one word: <|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n",
    ),
    "lamra_text_cand": (
        P.lamra_prompt('  "the cat sat?"\r '),
        SYS + "<|im_start|>user\nThe cat sat?\nSummarize above sentence in one word: <|im_end|>\n"
        "<|im_start|>assistant\n<emb>.<|im_end|>\n",
    ),
    "lamra_image_cand": (
        P.lamra_prompt(None, 1),
        SYS + "<|im_start|>user\n" + IMG + "\nSummarize above image in one word: <|im_end|>\n"
        "<|im_start|>assistant\n<emb>.<|im_end|>\n",
    ),
    "lamra_image_text_cand": (
        P.lamra_prompt("a red circle", 1),
        SYS + "<|im_start|>user\n" + IMG + "A red circle.\nSummarize above image and sentence in one word: <|im_end|>\n"
        "<|im_start|>assistant\n<emb>.<|im_end|>\n",
    ),
    "lamra_image_only_query": (  # the instruction becomes the text of the image+text template
        P.lamra_prompt(None, 1, "find a similar everyday image"),
        SYS + "<|im_start|>user\n" + IMG + "Find a similar everyday image.\n"
        "Summarize above image and sentence in one word: <|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n",
    ),
    "lamra_no_assistant": (
        P.lamra_prompt("x", with_assistant=False),
        SYS + "<|im_start|>user\nX.\nSummarize above sentence in one word: <|im_end|>\n",
    ),
    "elva_generation": (
        P.elva_prompt("make it blue", 1, "Edit the image:", generation=True),
        SYS + "<|im_start|>user\n" + IMG + "Edit the image: make it blue." + ELVA + "<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "elva_teacher_forced": (
        P.elva_prompt("a small red circle", summary="A small red circle at the top left."),
        SYS + "<|im_start|>user\nA small red circle." + ELVA + "<|im_end|>\n"
        "<|im_start|>assistant\nA small red circle at the top left. [RET]<|im_end|>\n",
    ),
    "elva_image_cand_no_summary": (
        P.elva_prompt(None, 1),
        SYS + "<|im_start|>user\n" + IMG + ELVA + "<|im_end|>\n<|im_start|>assistant\n[RET]<|im_end|>\n",
    ),
    "raw": (P.raw_prompt(" as is ", 2), IMG + IMG + " as is "),
    # Qwen3-VL-Embedding ("instruct_last"): instruction = system turn, text verbatim, generation prompt
    "instruct_text_query": (
        P.instruct_prompt("a dog running on grass", instruction="Find a caption for this description."),
        "<|im_start|>system\nFind a caption for this description.<|im_end|>\n"
        "<|im_start|>user\na dog running on grass<|im_end|>\n<|im_start|>assistant\n",
    ),
    "instruct_image_query": (
        P.instruct_prompt(None, 1, "Find a similar everyday image."),
        "<|im_start|>system\nFind a similar everyday image.<|im_end|>\n"
        "<|im_start|>user\n" + IMG + "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "instruct_image_text_cand": (
        P.instruct_prompt("a red circle", 1),
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n"
        "<|im_start|>user\n" + IMG + "a red circle<|im_end|>\n<|im_start|>assistant\n",
    ),
}

#: the same inputs written the way Qwen3-VL-Embedding's ``format_model_input`` builds them (system content
#: a text item; user content the images, then the text), independently of ``instruct_prompt``
QWEN3_VL_EMB_MESSAGES = {
    "instruct_text_query": [
        {"role": "system", "content": [{"type": "text", "text": "Find a caption for this description."}]},
        {"role": "user", "content": [{"type": "text", "text": "a dog running on grass"}]},
    ],
    "instruct_image_query": [
        {"role": "system", "content": [{"type": "text", "text": "Find a similar everyday image."}]},
        {"role": "user", "content": [{"type": "image", "image": "query.png"}]},
    ],
    "instruct_image_text_cand": [
        {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
        {"role": "user", "content": [{"type": "image", "image": "cand.png"}, {"type": "text", "text": "a red circle"}]},
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_equals_hand_written(name):
    prompt, want = CASES[name]
    assert prompt.rendered == want


def test_constants():
    assert P.ELVA_SUFFIX == ELVA
    assert P.DEFAULT_EMBED_INSTRUCTION == "Represent the user's input."
    assert P.LAMRA_IMAGE_TEXT_SUFFIX.endswith("word: ")  # the trailing space


def test_truncatable_item_is_the_user_text_only():
    prompt = P.lamra_prompt("hello", 1, "Find it:")
    items = prompt.messages[0]["content"]
    assert items[0] == {"type": "image"}
    assert items[1] == {"type": "text", "text": "Find it: hello.", "truncatable": True}
    assert items[2] == {"type": "text", "text": P.LAMRA_IMAGE_TEXT_SUFFIX}
    assert prompt.n_images == 1
    assert not any(c.get("truncatable") for m in prompt.messages[1:] for c in m["content"])


@pytest.mark.parametrize(
    "raw, want",
    [
        ("hello world", "Hello world."),
        ('  "quoted text"  ', "Quoted text."),
        ("line\r\nbreak\r", "Line\nbreak."),
        ("already done!", "Already done!"),
        ("a question?", "A question?"),
        ("ends.", "Ends."),
        ("", ""),
        (None, ""),
        ('"', ""),
        ("1 apple", "1 apple."),
    ],
)
def test_format_string(raw, want):
    assert P.format_string(raw) == want


def test_prompt_text():
    assert P.prompt_text("a dog", "Find the image.") == "Find the image. a dog."
    assert P.prompt_text(None, "find it") == "Find it."
    assert P.prompt_text("a dog") == "A dog."
    assert P.prompt_text(None) == ""


def test_instruct_prompt_items_and_default_instruction():
    prompt = P.instruct_prompt('  "as is"\r', 1, "Find it.")
    sys_turn, user = prompt.messages
    assert sys_turn == {"role": "system", "content": [{"type": "text", "text": "Find it."}]}
    # images first, the text verbatim (no format_string) and the only truncatable item
    assert user["content"] == [{"type": "image"}, {"type": "text", "text": '  "as is"\r', "truncatable": True}]
    assert prompt.add_generation_prompt and prompt.n_images == 1
    own = P.instruct_prompt("x", default_instruction="Represent the candidate.")
    assert own.rendered.startswith("<|im_start|>system\nRepresent the candidate.<|im_end|>\n")
    assert P.instruct_prompt("x", instruction="", default_instruction="D.").messages[0]["content"][0]["text"] == "D."
    with pytest.raises(ValueError):
        P.instruct_prompt(None, 0, "an instruction alone is no input")
    with pytest.raises(ValueError):
        P.instruct_prompt("x", default_instruction="")


def test_empty_prompt_raises():
    with pytest.raises(ValueError):
        P.lamra_prompt(None, 0)
    with pytest.raises(ValueError):
        P.elva_prompt("x", generation=True, summary="s")


def test_choose_instruction_deterministic():
    ins = ("A", "B", "C", "D")
    # seed None: crc32(qid) % n, the pipeline's rule; pinned values guard against hash changes
    for q in ("9:1", "9:2", "0:12345"):
        assert P.choose_instruction(ins, q) == ins[zlib.crc32(q.encode()) % 4]
    assert [P.choose_instruction(ins, q) for q in ("9:1", "9:2", "0:12345")] == ["C", "A", "C"]
    assert [P.choose_instruction(ins, q, seed=0) for q in ("9:1", "9:2", "0:12345")] == ["D", "D", "C"]
    assert [P.choose_instruction(ins, q, seed=1) for q in ("9:1", "9:2", "0:12345")] == ["C", "D", "B"]
    # repeatable, every prompt reachable, seeds give different assignments
    qids = [f"9:{i}" for i in range(400)]
    a = [P.choose_instruction(ins, q, seed=7) for q in qids]
    assert a == [P.choose_instruction(ins, q, seed=7) for q in qids]
    assert set(a) == set(ins)
    assert a != [P.choose_instruction(ins, q, seed=8) for q in qids]
    assert {P.choose_instruction(ins, q, fixed_index=2) for q in qids} == {"C"}
    with pytest.raises(IndexError):
        P.choose_instruction(ins, "9:1", fixed_index=4)
    with pytest.raises(ValueError):
        P.choose_instruction((), "9:1")


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_dir()), local_files_only=True)


@pytest.mark.parametrize("name", sorted(k for k in CASES if k != "raw"))
def test_render_equals_transformers_apply_chat_template(hf_tokenizer, name):
    prompt, _ = CASES[name]
    for vision_id in (False, True):
        want = hf_tokenizer.apply_chat_template(
            [dict(m) for m in prompt.messages],
            chat_template=P.QWEN_VL_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=prompt.add_generation_prompt,
            add_vision_id=vision_id,
        )
        got = P.render_chat(
            prompt.messages, add_generation_prompt=prompt.add_generation_prompt, add_vision_id=vision_id
        )
        assert got == want


def test_render_other_message_shapes(hf_tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "c"}]},
    ]
    for gen in (False, True):
        for vision_id in (False, True):
            want = hf_tokenizer.apply_chat_template(
                msgs,
                chat_template=P.QWEN_VL_CHAT_TEMPLATE,
                tokenize=False,
                add_generation_prompt=gen,
                add_vision_id=vision_id,
            )
            assert P.render_chat(msgs, add_generation_prompt=gen, add_vision_id=vision_id) == want
    assert P.render_chat(msgs).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("name", sorted(QWEN3_VL_EMB_MESSAGES))
def test_instruct_prompt_equals_apply_chat_template_of_qwen3_vl_embedding_messages(hf_tokenizer, name):
    """The rendered instruct_last prompt == transformers' rendering (generation prompt on) of the messages
    Qwen3-VL-Embedding builds for the same input."""
    prompt, hand_written = CASES[name]
    want = hf_tokenizer.apply_chat_template(
        QWEN3_VL_EMB_MESSAGES[name], chat_template=P.QWEN_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert prompt.rendered == want == hand_written
    assert want.endswith("<|im_start|>assistant\n")


def test_instruct_text_prompt_equals_the_tokenizer_directory_template(hf_tokenizer):
    """Text only, the tokenizer directory's own Qwen3 template (string contents, no default system turn)
    gives the same string: nothing depends on the Qwen2-VL template's default system prompt."""
    if "<|im_start|>" not in (hf_tokenizer.chat_template or ""):
        pytest.skip("the tokenizer directory carries no Qwen chat template")
    prompt, _ = CASES["instruct_text_query"]
    msgs = [{"role": m["role"], "content": P.render_content(m["content"])} for m in prompt.messages]
    assert hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt.rendered
