"""Session-wide test settings.

A persistent JAX compilation cache shared by every test process (xdist workers and the subprocess
checks, which inherit the environment): a program compiled once (the tiny model's steps, the same
run launched again by a resume test) is read back instead of compiled again. The programs are the
same either way, so results do not change; only compile time is saved. Set before jax is imported.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"elva_jax_test_xla_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The files that take longest, first: pytest-xdist (--dist loadfile) hands out files in collection
# order, so the long ones start early and the short ones fill in, instead of one long file running
# alone at the end.
LONGEST_FIRST = (
    "tests/train/test_multiprocess_resume.py",
    "tests/unit/test_main.py",
    "tests/rl/test_rl_step.py",
    "tests/train/test_loop.py",
    "tests/train/test_step.py",
    "tests/plan/test_gpu_presets.py",
    "tests/rl/test_micro_batches.py",
    "tests/rl/test_sampler.py",
    "tests/model/test_families.py",
    "tests/model/test_family_qwen2_5_vl.py",
    "tests/model/test_family_qwen3_vl.py",
    "tests/eval/test_eval_runner.py",
)


def pytest_collection_modifyitems(session, config, items):
    root = str(config.rootpath)

    def rank(item):
        rel = os.path.relpath(str(item.path), root)
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
