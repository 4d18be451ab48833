"""`python -m elva_jax.compare --text/--image`: our prompt/tokenizer/image path vs transformers' pieces, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("transformers")

from elva_jax import compare  # noqa: E402
from elva_jax.model.tiny import config_dict, write_random_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen2-VL with the real vocabulary (151936 rows) and a 60x90 PNG."""
    d = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(str(d / "model"), "tiny")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(d / "img.png")
    return str(d / "model"), str(d / "img.png")


def _run(capsys, argv):
    rc = compare.main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def test_eol_text_and_image_rows(ckpt, capsys):
    model, img = ckpt
    argv = ["--hf-dir", model, "--text", "a red circle", "--image", img, "--text", "another row, text only"]
    rc, res, _ = _run(capsys, [*argv, "--instruction", "Find the image:", "--tol", "1e-5"])
    assert rc == 0 and res["pass"] is True
    assert res["embedding_kind"] == "eol" and res["template"] == "eol" and res["n_images"] == 1
    assert res["errors"]["embedding"] <= 1e-5
    assert res["inputs"] == {
        "input_ids_equal": True,
        "attention_mask_equal": True,
        "image_grid_thw_equal": True,
        "pixel_values_max_abs_diff": 0.0,
    }
    assert res["rows"] == [{"text": "a red circle", "image": img}, {"text": "another row, text only", "image": None}]
    assert res["emb_token_id"] == 151669 and res["vocab_check"]["checkpoint"] == 151936


def test_ret_template_image_only_row_1d(ckpt, capsys):
    model, img = ckpt
    argv = ["--hf-dir", model, "--image", img, "--text", "", "--template", "ret", "--summary", "A noisy picture."]
    rc, res, _ = _run(capsys, [*argv, "--position-mode", "1d", "--pad-side", "right", "--tol", "1e-5"])
    assert rc == 0 and res["embedding_kind"] == "ret" and res["errors"]["embedding"] <= 1e-5
    assert res["rows"] == [{"text": None, "image": img}]


def test_tokenizer_larger_than_vocab_exits_2(ckpt, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    cfg = config_dict(
        vocab_size=151669,  # covers the tokenizer files but not <emb> / [RET]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=True,
        vision_depth=1,
        vision_embed_dim=32,
        vision_num_heads=2,
    )
    (small / "config.json").write_text(json.dumps(cfg))
    rc, res, err = _run(capsys, ["--hf-dir", str(small), "--text", "hi"])
    assert rc == 2 and res is None
    assert "151671 ids" in err and "vocabulary of 151669" in err and "resize" in err
