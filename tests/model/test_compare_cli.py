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
