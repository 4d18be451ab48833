"""Orbax checkpoint of state + Grain iterator: exact round trip, keep-last-N, corrupt newest step fallback."""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from elva_jax.runtime.checkpointing import Checkpointer, abstract_like


def _iter():
    return grain.MapDataset.source(list(range(100))).shuffle(seed=3).batch(4).to_iter_dataset().__iter__()


def _state(v):
    return {
        "w": jnp.full((4, 3), v, jnp.float32),
        "step": jnp.asarray(int(v), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(v))),
    }


def test_round_trip_and_iterator_resume(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2)
    it = _iter()
    next(it), next(it)
    ck.save(1, _state(1.0), it, {"loss": 0.5})
    for _ in range(3):
        next(it)  # iterator now at batch 5
    ck.save(2, _state(2.0), it)
    ck.save(3, _state(3.0), it)
    ck.wait()
    assert ck.steps() == [2, 3]  # keep the last 2
    it2 = _iter()
    state, meta = ck.restore(2, abstract_like(_state(0.0)), it2)
    assert float(state["w"][0, 0]) == 2.0
    # a fresh manager (as after a restart) restores the newest step; the iterator continues at batch 5
    ck.close()
    ck = Checkpointer(str(tmp_path), keep=2)
    it3 = _iter()
    step, state, _ = ck.restore_latest(abstract_like(_state(0.0)), it3)
    assert step == 3 and float(state["w"][0, 0]) == 3.0
    ref = _iter()
    for _ in range(5):
        next(ref)
    np.testing.assert_array_equal(next(it3), next(ref))
    ck.close()


def test_corrupt_latest_falls_back(tmp_path, capsys):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    it = _iter()
    ck.save(1, _state(1.0), it)
    next(it)
    ck.save(2, _state(2.0), it)
    ck.wait()
    # truncate every file of the newest step's state item (a preemption mid-write)
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)
    step, state, _ = ck.restore_latest(abstract_like(_state(0.0)), _iter())
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert "step 2 is corrupt or unreadable" in capsys.readouterr().out
    ck.close()


class _Positioned:
    """A minimal data iterator with the pipeline's state contract (set_state refuses another run's data)."""

    def __init__(self, seed):
        self.seed, self.pos = seed, 0

    def get_state(self):
        return {"global_next_index": self.pos, "seed": self.seed}

    def set_state(self, state):
        from elva_jax.data.errors import DataStateMismatch

        if state["seed"] != self.seed:
            raise DataStateMismatch(f"saved with seed {state['seed']}, this run has {self.seed}")
        self.pos = state["global_next_index"]


def test_another_runs_data_state_is_an_error_not_a_fresh_start(tmp_path):
    """A readable checkpoint whose data position belongs to other data must stop the resume, not be
    taken for a corrupt step (which would fall back through every step and then start from scratch)."""
    import pytest

    from elva_jax.data.errors import DataStateMismatch

    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    it = _Positioned(0)
    it.pos = 8
    ck.save(1, _state(1.0), it)
    ck.save(2, _state(2.0), it)
    ck.wait()
    with pytest.raises(DataStateMismatch, match="seed 0"):
        ck.restore_latest(abstract_like(_state(0.0)), _Positioned(5))
    ok = _Positioned(0)
    step, _, _ = ck.restore_latest(abstract_like(_state(0.0)), ok)
    assert step == 2 and ok.pos == 8
    ck.close()


def _saved(tmp_path, n=3, fingerprint=None, nonfinite=(0, 0, 0), keep=3):
    ck = Checkpointer(str(tmp_path), keep=keep, async_save=False, fingerprint=fingerprint or {"lora.rank": 4})
    it = _Positioned(0)
    for s in range(1, n + 1):
        it.pos = 4 * s
        ck.save(s, _state(float(s)), it, {"nonfinite": nonfinite[s - 1]})
    ck.wait()
    return ck


def test_a_flipped_byte_is_detected_and_the_previous_step_used(tmp_path, capsys):
    ck = _saved(tmp_path)
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "3" / "state") for f in fs if "ocdbt" in r]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as fh:
        b = fh.read(1)
        fh.seek(0)
        fh.write(bytes([b[0] ^ 0x01]))
    assert ck.verify(3) is not None and ck.verify(2) is None
    step, state, _ = ck.restore_latest(abstract_like(_state(0.0)), _Positioned(0))
    assert step == 2 and float(state["w"][0, 0]) == 2.0
    assert "step 3 is corrupt" in capsys.readouterr().out
    ck.close()


def test_an_incompatible_checkpoint_stops_and_deletes_nothing(tmp_path):
    """Another shape (e.g. a changed lora.rank) is not 'unreadable': the resume stops naming the tensor,
    and every step stays on disk."""
    import pytest

    from elva_jax.runtime.checkpointing import CheckpointIncompatible

    _saved(tmp_path).close()
    wider = {**_state(0.0), "w": jnp.zeros((4, 5), jnp.float32)}
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False, fingerprint={"lora.rank": 4})
    with pytest.raises(CheckpointIncompatible, match=r"w: checkpoint \(\(4, 3\)"):
        ck.restore_latest(abstract_like(wider), _Positioned(0))
    assert ck.steps() == [1, 2, 3]
    ck.close()


def test_a_changed_fingerprint_stops_unless_allowed(tmp_path):
    import pytest

    from elva_jax.runtime.checkpointing import CheckpointIncompatible

    _saved(tmp_path, fingerprint={"train.global_batch": 8, "lora.rank": 4}).close()
    now = {"train.global_batch": 16, "lora.rank": 4}
    ck = Checkpointer(str(tmp_path), async_save=False, fingerprint=now)
    with pytest.raises(CheckpointIncompatible, match="train.global_batch: checkpoint 8, now 16"):
        ck.restore_latest(abstract_like(_state(0.0)), _Positioned(0))
    ck.close()
    ck = Checkpointer(str(tmp_path), async_save=False, fingerprint=now, allow_changed=("train.global_batch",))
    step, _, _ = ck.restore_latest(abstract_like(_state(0.0)), _Positioned(0))
    assert step == 3
    ck.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    import pytest

    from elva_jax.runtime.checkpointing import CheckpointNotFound

    ck = _saved(tmp_path, n=2)
    for s in ("1", "2"):
        for root, _, files in os.walk(tmp_path / s / "state"):
            for f in files:
                open(os.path.join(root, f), "wb").close()
    with pytest.raises(CheckpointNotFound, match="Not starting over"):
        ck.restore_latest(abstract_like(_state(0.0)), _Positioned(0))
    assert ck.steps() == [1, 2]
    ck.close()


def test_rotation_keeps_the_last_step_no_non_finite_update_followed(tmp_path):
    """Skipped (non-finite) updates counted 0, 0, 1, 2, 3 at steps 1-5: the updates from step 1 to 2 were
    the last finite stretch, so step 1 stays besides the last 2 steps."""
    ck = _saved(tmp_path, n=5, nonfinite=(0, 0, 1, 2, 3), keep=2)
    assert ck.steps() == [1, 4, 5]
    ck.close()
