"""An RL checkpoint restores the LoRA, optimizer state, step and RNG key, and the run's count of skipped
non-finite updates (so train.max_nonfinite bounds the whole run across resumes, not each invocation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elva_jax.rl.loop import restore_rl_state, rl_saveable
from elva_jax.rl.trainer import RLState
from elva_jax.runtime.checkpointing import Checkpointer


def _state(v: float, step: int, skipped: int) -> RLState:
    lora = {"q_proj": {"a": jnp.full((2, 3), v), "b": jnp.full((3, 2), -v)}}
    opt = optax.adam(1e-3).init(lora)
    return RLState(step, {"frozen": jnp.zeros(2)}, lora, opt, jax.random.key(step), skipped=skipped)


def test_restore_continues_step_key_lora_and_the_skipped_count(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False, with_data_iter=False, fingerprint={"rl.lr": 1e-6})
    for step, skipped in ((1, 0), (2, 3)):
        st = _state(float(step), step, skipped)
        ck.save(step, rl_saveable(st), None, {"nonfinite": st.skipped}, force=True)
    ck.close()
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False, with_data_iter=False, fingerprint={"rl.lr": 1e-6})
    fresh = _state(0.0, 0, 0)
    step0, got = restore_rl_state(ck, fresh)
    ck.close()
    want = _state(2.0, 2, 3)
    assert step0 == 2 and got.step == 2 and got.skipped == 3
    np.testing.assert_array_equal(got.lora["q_proj"]["a"], want.lora["q_proj"]["a"])
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(want.key))
    assert got.params is fresh.params  # the frozen base is the run's own, not read back
