"""The 8 x H100 presets: each loads, fills one 8-GPU node, keeps the paper / LamRA recipe of the preset it
derives from, and its programs (Qwen2-VL-7B at small batch shapes) AOT-compile on 8 fake devices as `h100:8`.
The launch script's XLA flags are ones this jaxlib knows (an unknown flag aborts XLA at start-up)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
from helpers.device_check import without_device_count

from elva_jax import configlib, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*_8xh100.yaml")))
LAUNCH = os.path.join(ROOT, "launch", "gpu_node_8xh100.sh")
# what a node-sized preset may change against its paper preset: the mesh, accumulation and RL batching
MAY_DIFFER = {"mesh", "train.micro_batches", "model.param_dtype", "rl.micro_instances", "rl.prompt_buckets"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _name(path: str) -> str:
    return os.path.basename(path)


def test_there_is_a_preset_per_stage():
    names = {_name(p) for p in PRESETS}
    assert {"qwen2vl_7b_nli_8xh100.yaml", "qwen2vl_7b_mbeir_8xh100.yaml", "qwen2vl_7b_elva_rl_8xh100.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=_name)
def test_preset_fills_the_node_and_keeps_the_recipe(path):
    run = plan.load_run(path)
    sizes = [run.mesh.data, run.mesh.fsdp, run.mesh.tensor]
    assert -1 not in sizes and math.prod(sizes) == 8, sizes
    base = plan.load_run(path.replace("_8xh100.yaml", ".yaml"))
    a, b = _flat(configlib.to_dict(run)), _flat(configlib.to_dict(base))
    changed = {k for k in a if a[k] != b[k]}
    assert all(k.split(".")[0] in MAY_DIFFER or k in MAY_DIFFER for k in changed), sorted(changed)


# small shapes with the presets' mesh, dtypes, LoRA and micro-batching; the tiny model where its 2 KV heads
# allow the mesh, Qwen2-VL-7B dims for the RL preset (tensor=4 splits its 4 KV heads)
SMALL = {
    "qwen2vl_7b_nli_8xh100.yaml": ["--programs", "train", "--model", "tiny", "--batch", "64", "--seq", "64"],
    "qwen2vl_7b_mbeir_8xh100.yaml": ["--programs", "train", "--model", "tiny", "--batch", "96", "--seq", "128"],
    "qwen2vl_7b_elva_rl_8xh100.yaml": ["--seq", "64", "--rl-candidates", "3", "--rl-group", "2"],
}


def test_presets_compile_at_small_shapes_for_h100_8():
    """One fresh process (8 fake CPU devices, planned as h100:8) compiles every preset's programs at small shapes."""
    script = (
        "import sys, json\n"
        "from elva_jax.plan import main\n"
        "codes = [main(json.loads(a)) for a in sys.argv[1:]]\n"
        "print('CODES', codes)\n"
    )
    calls = [
        json.dumps(["--config", p, "--topology", "h100:8", *SMALL.get(_name(p), ["--batch", "64", "--seq", "64"])])
        for p in PRESETS
    ]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    r = subprocess.run(
        [sys.executable, "-c", script, *calls], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and f"CODES {[0] * len(PRESETS)}" in r.stdout, r.stdout[-4000:] + r.stderr[-3000:]
    assert "8 device(s) on 8 x NVIDIA H100, 80 GiB HBM each" in r.stdout
    assert "temporaries come from XLA:CPU's buffer assignment" in r.stdout  # the GPU plan says what it is
    assert "compile train" in r.stdout and "compile rl_update" in r.stdout and "compile decode" in r.stdout


def test_launch_script_flags_are_known_to_xla():
    text = open(LAUNCH).read()
    flags = re.search(r'XLA_FLAGS_8XH100="([^"]+)"', text).group(1)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = flags
    r = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(2).sum()))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "2.0" in r.stdout, r.stderr[-2000:]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text and "python -m elva_jax.train" in text
