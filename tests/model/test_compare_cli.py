"""`python -m elva_jax.compare` end to end on a tiny checkpoint and an npz of inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.hf_oracle import make_batch

from elva_jax import compare

pytestmark = pytest.mark.reference


def test_compare_cli_reports_and_gates(hf_factory, tmp_path, capsys):
    _, d = hf_factory()
    ids, am, pv, g = make_batch([[(1, 4, 4)], []], "left", np.random.default_rng(21))
    f = tmp_path / "in.npz"
    np.savez(f, input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=g)
    assert compare.main(["--hf-dir", d, "--inputs", str(f), "--per-layer", "--tol", "1e-5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["errors"]) == {"last_hidden_state", "logits", "embedding"}
    assert len(res["per_layer"]) == 2 and res["pass"] is True
    assert res["n_images"] == 1 and res["reference_dtype"] == "float32"
    # an impossible tolerance fails with exit status 1
    assert compare.main(["--hf-dir", d, "--inputs", str(f), "--tol", "1e-12"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["pass"] is False and res["max_error"] > 1e-12


def test_compare_random_inputs_bf16(hf_factory, capsys):
    _, d = hf_factory(tie=True)
    assert compare.main(["--hf-dir", d, "--dtype", "bfloat16", "--position-mode", "1d", "--tol", "2e-2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == "bfloat16" and res["position_mode"] == "1d" and res["n_images"] == 3


@pytest.mark.parametrize(
    "case, match",
    [
        ("float_ids", "must be integers"),
        ("oov", "outside the vocabulary"),
        ("empty", "non-empty"),
        ("grid", "covers 16 patches, pixel_values has 20 rows"),
        ("not_npz", "not a readable .npz"),
    ],
)
def test_compare_refuses_bad_inputs_before_running(hf_factory, tmp_path, case, match):
    from elva_jax.compare import CompareInputError

    _, d = hf_factory()
    ids, am, pv, g = make_batch([[(1, 4, 4)]], "left", np.random.default_rng(3))
    f = tmp_path / "in.npz"
    if case == "float_ids":
        np.savez(f, input_ids=ids.astype(np.float32) + 0.5, attention_mask=am)
    elif case == "oov":
        np.savez(f, input_ids=ids + 10_000, attention_mask=am)
    elif case == "empty":
        np.savez(f, input_ids=np.zeros((0, 5), np.int64))
    elif case == "grid":
        np.savez(f, input_ids=ids, attention_mask=am, pixel_values=np.concatenate([pv, pv[:4]]), image_grid_thw=g)
    else:
        f.write_text("not a numpy archive")
    with pytest.raises(CompareInputError, match=match):
        compare.main(["--hf-dir", d, "--inputs", str(f)])
