"""The RL stage's rollout prompts take images, not videos yet: a video side is refused with an error
naming it, never encoded without its video."""

from __future__ import annotations

import pytest

from elva_jax.data.errors import RecordError
from elva_jax.rl.trainer import encode_prompts


class _NeverCalled:
    def encode(self, *a, **k):
        raise AssertionError("the encoder must not see a video side")


@pytest.mark.parametrize("side", [{"text": "a clip", "video": "clips/a.mp4"}, {"text": "x", "video_data": b"\0"}])
def test_a_video_side_is_refused_by_name(side):
    side = {**side, "where": "query q7 of train.jsonl"}
    with pytest.raises(RecordError, match="q7 of train.jsonl.*do not take video"):
        encode_prompts([side], _NeverCalled(), min_pixels=1, max_pixels=2, buckets=(8,), pad_id=0, geometry=None)
