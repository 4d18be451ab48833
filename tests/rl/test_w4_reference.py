"""W4's PyTorch reference (elva_jax.bench.rl_step_torch) computes the same RL step as elva_jax.

The oracle runs the other way round too: transformers + peft + TRL's loss on the tiny model exported by
elva_jax's checkpoint writer, with elva_jax's LoRA copied into peft. Rollouts are sampled by
transformers' ``generate`` and replayed into ``RLTrainer.step(..., samples=...)``; both sides then see
the same tokens and weights, and must give the same log-probs, [RET] embeddings, rewards and GRPO loss.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.rl_setup import LCFG, fresh_state, instances, make_trainer

from elva_jax.rl.rollout import RLConfig

pytestmark = [pytest.mark.reference, pytest.mark.slow]
pytest.importorskip("trl", reason="the W4 reference needs trl (pip install elva_jax[bench])")
pytest.importorskip("peft", reason="the W4 reference needs peft (pip install elva_jax[bench])")
torch = pytest.importorskip("torch", reason="the W4 reference needs torch")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    import transformers

    from elva_jax.bench.rl_step_torch import TorchRLStep, load_jax_lora, lora_model
    from elva_jax.model.hf_checkpoint import save_params
    from elva_jax.model.sampler import Samples

    torch.manual_seed(0)
    data = instances(str(tmp_path_factory.mktemp("mg")), n_neg=2)
    insts = [next(i for i in data if any(s["image"] for s in [i["query"], *i["cands"]]))]  # with image sides
    tr, st = make_trainer(RLConfig(group_size=4, max_summary_tokens=4), cache_dtype="float32")
    d = str(tmp_path_factory.mktemp("hf"))
    save_params(d, st.params, tr.cfg)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    pm = lora_model(hf, rank=LCFG.rank, alpha=LCFG.alpha, targets=LCFG.targets)
    load_jax_lora(pm, st.lora)
    ids, am, pvs, grids = tr.encode_instances(insts)
    ref = TorchRLStep(
        pm, tr.rcfg, tr.reward_cfg, lr=1e-3, weight_decay=1e-4, ret_id=tr.ret_id, eos_id=tr.eos_id, pad_id=tr.pad_id
    )
    smp = ref.rollout(ids, am, pvs, grids, tr.rcfg.group_size)
    tm = ref.step(ids, am, pvs, grids, len(insts), samples=smp)
    old = tm["old_logp"].numpy()
    samples = Samples(
        smp["tokens"].astype(np.int32),
        np.where(smp["mask"], old, 0.0).astype(np.float32),
        smp["mask"],
        smp["lengths"].astype(np.int32),
        smp["forced_ret"],
    )
    # elva_jax's re-forward of the same rows (state not donated), then its whole step on them
    st1 = fresh_state(tr)
    _, _, (I, G, S), chunks = tr.rollouts(st1, insts, samples)
    j_old, _, j_emb = tr.reforward(st1, chunks, samples.tokens, samples.lengths, G)
    _, jm = tr.step(fresh_state(tr), insts, samples=samples)
    return {"ret_id": tr.ret_id, "smp": smp, "tm": tm, "jm": jm, "j_old": np.asarray(j_old), "j_emb": np.asarray(j_emb)}


def test_rollout_convention(both):
    smp = both["smp"]
    n = smp["mask"].sum(1)
    # every row ends with [RET] at lengths - 1; a sampled [RET] is in the mask, an appended one is not
    ln = smp["lengths"]
    assert (ln >= 1).all() and (ln <= smp["tokens"].shape[1]).all()
    assert (smp["tokens"][np.arange(len(ln)), ln - 1] == both["ret_id"]).all()
    assert ((n == ln - 1) | (n == ln)).all() and (n[smp["forced_ret"]] == ln[smp["forced_ret"]] - 1).all()
    assert smp["tokens"].shape == (1 * 4 * 4, 5)  # I * S * G rows, budget + 1 slots


def test_same_logps_and_embeddings(both):
    m = both["smp"]["mask"]
    # fp32 on both sides, different kernels: measured ~1e-6; a misplaced position or temperature is O(1)
    np.testing.assert_allclose(both["tm"]["old_logp"].numpy()[m], both["j_old"][m], atol=2e-4, rtol=0)
    np.testing.assert_allclose(both["tm"]["emb"].numpy(), both["j_emb"], atol=1e-4, rtol=0)
    assert both["jm"]["sampler_vs_trainer_logp"] < 1e-4  # the torch log-probs, replayed, seen by the trainer


def test_same_rewards_and_grpo_loss(both):
    tm, jm = both["tm"], both["jm"]
    for k in ("reward", "reward_std", "reward_margin", "reward_ranking"):  # ~0.1 each
        assert abs(tm[k] - jm[k]) <= 1e-4, (k, tm[k], jm[k])
    assert jm["kl_mean"] > 1e-6  # the LoRA is not zero: policy and reference differ, the loss is not a bare 0
    assert abs(tm["kl_mean"] - jm["kl_mean"]) <= 1e-3 * jm["kl_mean"] + 1e-7, (tm["kl_mean"], jm["kl_mean"])
    assert abs(tm["loss"] - jm["loss"]) <= 1e-3 * abs(jm["loss"]) + 1e-6, (tm["loss"], jm["loss"])
    assert tm["tokens_sampled"] == jm["tokens_sampled"]
    assert np.isfinite(jax.tree.leaves(jm["loss"])[0])
