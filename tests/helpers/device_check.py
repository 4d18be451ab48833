"""Run a check script in a fresh process (it sets its own fake-device count) and read its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_device_count(flags: str) -> str:
    """XLA_FLAGS less --xla_force_host_platform_device_count (a check sets its own device count)."""
    return " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))


def run_check(script: str, *args: str, timeout: int = 600) -> dict:
    """`python <script> <args>` with tests/ and this checkout's elva_jax importable (not another install of
    it) and no inherited fake-device count (other XLA flags, such as --xla_cpu_max_isa, are kept); the last
    stdout line parsed as JSON. Fails the test with the script's stderr when it exits non-zero."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.path.dirname(TESTS)]))
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
