"""The README's main command runs end to end and records its resolved config."""

from __future__ import annotations

import json
import os

import pytest

from elva_jax.smoke import main


@pytest.mark.slow
def test_default_run(tmp_path, capsys):
    main([f"run.dir={tmp_path}"])
    res = json.loads(open(os.path.join(tmp_path, "smoke.json")).read())
    assert res["embeddings"] == [4, 64]
    assert os.path.exists(tmp_path / "config.yaml")
    assert "results:" in capsys.readouterr().out


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="did you mean 'dir'"):
        main([f"run.dri={tmp_path}"])
