"""The media settings' part of the embedding and T-CoT cache fingerprints keeps its keys and values
(caches written when every config declared its own pixel and video fields stay valid)."""

from __future__ import annotations

import hashlib
import json

from elva_jax.data.media.settings import MediaSettings
from elva_jax.eval.cot import CoTConfig
from elva_jax.eval.embed_config import EmbedConfig


def _sha(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_embedding_fingerprint_names_only_media_settings_off_their_defaults():
    assert not {"pixels", "video"} & set(EmbedConfig().describe())  # (older fingerprints had neither)
    assert "pixels" not in EmbedConfig(media=MediaSettings(patch_row_len=64)).describe()  # a shape, not a setting
    d = EmbedConfig(media=MediaSettings(min_pixels=3136, max_pixels=12544, video_fps=1.0)).describe()
    assert d["pixels"] == [3136, 12544]
    assert d["video"] == {
        "video_fps": 1.0,
        "video_min_frames": 4,
        "video_max_frames": 8,
        "video_min_pixels": 4 * 28 * 28,
        "video_max_pixels": 64 * 28 * 28,
    }
    # the digests of the same settings before MediaSettings
    assert _sha(EmbedConfig().describe()) == "bbb4da1c805e2337"
    assert _sha(d) == "49d1728da954577f"


def test_cot_fingerprint_keeps_its_pixel_and_video_entries():
    assert _sha(CoTConfig().describe()) == "fa1cdecce4a0f035"
    media = MediaSettings(patch_row_len=64, min_pixels=3136, max_pixels=12544, video_max_pixels=0)
    d = CoTConfig(media=media).describe()
    assert d["pixels"] == [3136, 12544] and d["video"]["video_max_pixels"] == 0
    assert _sha(d) == "24581b6260c15309"
