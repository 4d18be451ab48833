"""Fixtures for model tests: tiny random transformers checkpoints saved to temp dirs."""

from __future__ import annotations

import pytest
from helpers.hf_oracle import make_hf_model


@pytest.fixture(scope="module")
def hf_factory(tmp_path_factory):
    """Returns build(**kw) -> (torch model, directory); cached per module and config."""
    cache = {}

    def build(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            m = make_hf_model(**kw)
            d = tmp_path_factory.mktemp("hf")
            m.save_pretrained(d)
            cache[key] = (m, str(d))
        return cache[key]

    return build
