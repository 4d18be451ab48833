"""Config validation: misspelt keys name the closest valid key; types are checked; overrides apply."""

from __future__ import annotations

import dataclasses

import pytest

from elva_jax.configlib import ConfigError, load, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    clip_norm: float | None = None


@dataclasses.dataclass(frozen=True)
class Top:
    optim: Optim = Optim()
    buckets: tuple[int, ...] = (64, 128)
    kl: str = dataclasses.field(default="k3", metadata={"choices": ("k1", "k2", "k3")})
    steps: int = 10


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 2\nbuckets: [32, 64]\n")
    cfg = load(Top, str(p), ["optim.clip_norm=1.5", "steps=3", "kl=k1"])
    assert cfg == Top(Optim(2.0, 1.5), (32, 64), "k1", 3)
    assert to_dict(cfg) == {"optim": {"lr": 2.0, "clip_norm": 1.5}, "buckets": [32, 64], "kl": "k1", "steps": 3}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"config\.optim: unknown key 'lrr' \(did you mean 'lr'\?\)"),
        (["stpes=2"], r"unknown key 'stpes' \(did you mean 'steps'\?\)"),
        (["steps=1.5"], r"config\.steps: expected an integer"),
        (["kl=k4"], r"config\.kl: 'k4' is not one of"),
        (["optim=3"], r"config\.optim: expected a mapping"),
        (["nokey"], r"must look like key.sub=value"),
    ],
)
def test_rejections_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(Top, None, overrides)


def test_bad_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load(Top, str(p))


def test_exponent_without_a_dot_is_a_number():
    """PyYAML reads `1e-3` as a string (YAML 1.1 wants a dot); a float field takes it as the number."""
    import dataclasses

    from elva_jax import configlib

    @dataclasses.dataclass(frozen=True)
    class C:
        lr: float = 1.0
        name: str = ""

    assert configlib.load(C, None, ["lr=1e-3"]).lr == 1e-3
    assert configlib.load(C, None, ["lr=-2E+2"]).lr == -200.0
    assert configlib.load(C, None, ["name=1e-3"]).name == "1e-3"  # a string field keeps its text
    with pytest.raises(configlib.ConfigError, match="expected a number"):
        configlib.load(C, None, ["lr=fast"])


def test_inherited_fields_are_keys_of_the_section():
    """A section that inherits a dataclass (the data section inherits `MediaSettings`) takes its fields as
    keys, type-checked and suggested like its own; its own fields keep their ``choices``."""
    from elva_jax.data.media.settings import MediaSettings
    from elva_jax.schema import RunConfig, project

    cfg = load(RunConfig, None, ["data.min_pixels=100", "data.video_fps=1", "data.kind=nli"])
    assert (cfg.data.min_pixels, cfg.data.video_fps, cfg.data.kind) == (100, 1.0, "nli")
    assert project(MediaSettings, cfg.data) == MediaSettings(min_pixels=100, video_fps=1.0)
    assert to_dict(cfg)["data"]["max_pixels"] == MediaSettings.max_pixels
    for bad, message in [
        ("data.min_pixel=1", r"unknown key 'min_pixel' \(did you mean 'min_pixels'\?\)"),
        ("data.patch_row_len=1.5", r"data\.patch_row_len: expected an integer"),
        ("data.kind=x", r"data\.kind: 'x' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(RunConfig, None, [bad])
