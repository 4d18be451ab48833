"""`python -m elva_jax.plan`: AOT plans on fake CPU devices and (with libtpu) TPU topologies, and the
clear failures (does not fit, mesh does not divide). Compiles run in subprocesses with fake devices."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers.device_check import without_device_count

from elva_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def run_plan(*args, timeout=300):
    env = dict(os.environ)
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    env.pop("JAX_PLATFORMS", None)
    return subprocess.run(
        [sys.executable, "-m", "elva_jax.plan", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_tiny_config_compiles_all_three_programs_on_8_cpu_devices(tmp_path):
    out = tmp_path / "plan.json"
    r = run_plan(
        "--config", TINY, "--topology", "cpu:8", "--mesh", "data=2,fsdp=2,tensor=2", "--rl-candidates", "3",
        "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and rep["fits"]
    assert set(rep["programs"]) == {"train", "rl_update", "decode"}
    param_bytes = rep["params"] * 4  # fp32
    for name, p in rep["programs"].items():
        assert p["argument"] > 0 and p["temp"] >= 0 and p["total"] > 0 and p["flops"] > 0, name
        assert p["xla_flops_per_device"] and p["xla_flops_per_device"] > 0, name
        assert p["error"] is None and p["fits"]
        # every tensor is split over fsdp (2) and most also over tensor (2): a quarter to a half per device
        assert param_bytes / 4 <= p["arguments_per_device"]["params"] <= param_bytes / 2, name
        # XLA's arguments are at least the ones we passed
        assert p["argument"] >= sum(p["arguments_per_device"].values()) * 0.99, name
    assert rep["programs"]["train"]["alias"] > 0  # the state is donated
    assert "GiB per device" in r.stdout and "TFLOP/step" in r.stdout


def test_embed_rl_plan_holds_both_models_on_8_cpu_devices(tmp_path):
    """rl.recipe=embed_rl: the reasoner's update and decode, and the frozen embedder's pass over the
    step's N = I x 2 x G rollouts; each program counts the other model as resident. The embedder's
    size is checked against its initialised params (arrays, not the plan's abstract tree)."""
    from elva_jax.model.params import init_params
    from elva_jax.model.tiny import preset_config

    out = tmp_path / "plan.json"
    cfg = os.path.join(ROOT, "configs", "tiny_embed_rl.yaml")
    small = ("rl.instances_per_step=2", "rl.group_size=2", "rl.max_summary_tokens=8")
    mesh = ("--mesh", "data=2,fsdp=2,tensor=2")
    r = run_plan("--config", cfg, "--topology", "cpu:8", *mesh, "--json", str(out), *small)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["programs"]) == {"rl_update", "decode", "embed"} and rep["fits"]
    assert rep["shapes"]["S"] == 2  # pairs: the query and its positive
    leaves = jax.tree.leaves(init_params(preset_config("tiny_qwen3_vl"), jax.random.key(0), jnp.float32))
    assert rep["embedder_params"] == sum(x.size for x in leaves)
    emb_bytes = sum(x.size * 4 for x in leaves)
    progs = rep["programs"]
    embedded = progs["embed"]["arguments_per_device"]["embedder params"]
    assert emb_bytes / 8 <= embedded <= emb_bytes  # laid out by its own logical rules over the mesh
    for name in ("rl_update", "decode"):
        assert progs[name]["arguments_per_device"]["embedder params (resident)"] == embedded, name
    resident = progs["embed"]["arguments_per_device"]
    assert resident["reasoner params (resident)"] == progs["rl_update"]["arguments_per_device"]["params"]
    assert resident["optimizer (resident)"] == progs["rl_update"]["arguments_per_device"]["optimizer"]
    I, G = 2, 2  # rl.instances_per_step, rl.group_size
    assert progs["embed"]["note"].startswith(f"{I * 2 * G} rows = I={I} pairs x 2 sides x G={G}")
    for p in progs.values():  # the resident model is in the total
        assert p["total"] >= sum(p["arguments_per_device"].values()) and p["error"] is None
    # an embedder pass that does not fit is told to split its rows (8 rows, data x fsdp = 4)
    r = run_plan("--config", cfg, "--topology", "cpu:8", *mesh, "--programs", "embed", "--hbm-gib", "0.0001", *small)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "embed_rl.embedder_micro_rows=4" in r.stdout and "embedder_seq_buckets" in r.stdout


def test_embed_rl_plan_of_a_fully_fine_tuned_reasoner(tmp_path):
    """lora.enabled=false under Embed-RL: the update trains the whole tree (its AdamW state two fp32
    copies of it) against a frozen reference copy, and both copies and the state stay resident while
    the policy samples."""
    out = tmp_path / "plan.json"
    cfg = os.path.join(ROOT, "configs", "tiny_embed_rl.yaml")
    r = run_plan(
        "--config", cfg, "--topology", "cpu:4", "--mesh", "data=1,fsdp=4,tensor=1", "--programs", "rl_update,decode",
        "--json", str(out), "lora.enabled=false", "rl.max_summary_tokens=8",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    progs = json.loads(out.read_text())["programs"]
    upd, dec = progs["rl_update"]["arguments_per_device"], progs["decode"]["arguments_per_device"]
    assert "lora" not in upd and upd["trainable params"] == upd["params"]
    assert 2 * upd["params"] <= upd["optimizer"] <= 2 * upd["params"] + 64  # mu, nu (+ the step count)
    assert "full fine-tuning" in progs["rl_update"]["note"]
    assert dec["params"] == dec["reference params (resident)"] == upd["params"]
    assert dec["optimizer (resident)"] == upd["optimizer"] and "lora" not in dec


def test_jaxpr_flops_multiplies_scanned_layers_and_counts_remat():
    L, B, D = 6, 16, 32

    def f(w, x, remat):
        body = lambda h, wi: (jnp.tanh(h @ wi), None)  # noqa: E731
        if remat:
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, x, w)[0].sum()

    w, x = jax.ShapeDtypeStruct((L, D, D), jnp.float32), jax.ShapeDtypeStruct((B, D), jnp.float32)
    fwd = 2 * B * D * D * L
    assert plan.jaxpr_flops(jax.make_jaxpr(lambda w, x: f(w, x, False))(w, x).jaxpr) == fwd
    # backward: dL/dh and dL/dw, one matmul each per layer; remat: one more forward
    assert plan.jaxpr_flops(jax.make_jaxpr(jax.grad(lambda w, x: f(w, x, False)))(w, x).jaxpr) == 3 * fwd
    assert plan.jaxpr_flops(jax.make_jaxpr(jax.grad(lambda w, x: f(w, x, True)))(w, x).jaxpr) == 4 * fwd


def test_model_sizes_match_the_published_parameter_counts():
    from elva_jax.model.params import abstract_params, count_params

    # Qwen2-VL model cards: 8.29B (7B) and 2.21B (2B) parameters
    assert round(count_params(abstract_params(plan.model_config("7b"))) / 1e9, 2) == 8.29
    assert round(count_params(abstract_params(plan.model_config("2b"))) / 1e9, 2) == 2.21


def test_model_size_is_read_from_the_checkpoint_path():
    run7 = plan.load_run(os.path.join(ROOT, "configs", "qwen2vl_7b_nli.yaml"))
    assert plan.resolve_model(run7)[0].text.hidden_size == 3584
    run2 = plan.load_run(os.path.join(ROOT, "configs", "qwen2vl_2b_mbeir.yaml"))  # runs/qwen2vl_2b_nli/export
    assert plan.resolve_model(run2)[0].text.hidden_size == 1536
    assert plan.resolve_model(plan.load_run(TINY))[0].text.hidden_size == 64
    with pytest.raises(plan.PlanError, match="--model"):
        plan.resolve_model(plan.load_run(TINY, ["model.checkpoint=/ckpt/mystery"]))


def test_a_plan_that_does_not_fit_fails_with_suggestions():
    r = run_plan("--config", TINY, "--topology", "cpu:1", "--hbm-gib", "0.02", "--rl-candidates", "3")
    assert r.returncode == plan.EXIT_NOT_FIT, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DOES NOT FIT" in r.stdout and "Try (then re-plan)" in r.stdout
    assert "does not fit cpu:1" in r.stderr


def test_7b_on_one_small_device_fails_before_compiling():
    r = run_plan(
        "--config", os.path.join(ROOT, "configs", "qwen2vl_7b_mbeir.yaml"), "--topology", "cpu:1",
        "--mesh", "data=1,fsdp=1,tensor=1", "--hbm-gib", "16", "--programs", "train",
    )  # fmt: skip
    assert r.returncode == plan.EXIT_NOT_FIT, r.stdout[-3000:] + r.stderr[-3000:]
    assert "arguments alone exceed HBM" in r.stdout
    assert "model.param_dtype=bfloat16" in r.stdout  # 33 GB of fp32 frozen base on a 16 GiB device


@pytest.mark.parametrize(
    "args, message",
    [
        (("--topology", "cpu:3", "--mesh", "data=1,fsdp=1,tensor=3"), "cannot be split 3 ways"),
        (("--topology", "cpu:3", "--mesh", "data=3,fsdp=1,tensor=1"), "cannot be split over data x fsdp = 3"),
        (("--topology", "cpu:2", "--mesh", "data=1,fsdp=4,tensor=1"), "needs 4 devices"),
        (("--topology", "v9z:2x2"), "unknown topology"),
    ],
)
def test_a_mesh_that_does_not_divide_fails_clearly(args, message):
    r = run_plan("--config", TINY, *args, "--programs", "train")
    assert r.returncode in (plan.EXIT_MESH, plan.EXIT_TOPOLOGY), r.stdout[-2000:] + r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the TPU path is tested below")
def test_tpu_topology_without_libtpu_says_what_to_install():
    r = run_plan("--config", TINY, "--topology", "v5e:2x2", "--programs", "train")
    assert r.returncode == plan.EXIT_TOPOLOGY
    assert "needs libtpu" in r.stderr and "jax[tpu]" in r.stderr


@pytest.mark.skipif(
    not HAS_LIBTPU,
    reason='libtpu is not installed here; AOT compilation for TPU topologies needs it: pip install "jax[tpu]==0.10.2" '
    "(the project's [tpu] extra), best in a separate venv",
)
def test_tpu_topology_aot_compiles_for_v5e_2x2(tmp_path):
    out = tmp_path / "plan.json"
    r = run_plan(
        "--config", TINY, "--topology", "v5e:2x2", "--mesh", "data=1,fsdp=4,tensor=1", "--rl-candidates", "3",
        "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["chip"] == "TPU v5e" and rep["devices"] == 4 and rep["hbm_bytes_per_device"] == 16 * 2**30
    assert rep["peak_flops_per_device"] == 197e12
    for p in rep["programs"].values():
        assert p["fits"] and p["argument"] > 0 and p["est_step_s"] > 0
