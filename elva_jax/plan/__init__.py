"""Pod-scale plans proven by ahead-of-time compilation: does a run fit a topology, and how fast could it go?

    python -m elva_jax.plan --config configs/qwen2vl_7b_mbeir.yaml --topology v5p:2x2x2 \\
        [--mesh data=1,fsdp=8,tensor=1] [--batch N] [--seq L] [--json out.json] [key.sub=value ...]
    python -m elva_jax.plan --dump-goldens tests/goldens      # rewrite the golden sharding dumps

Topologies: "cpu:N" (N fake CPU devices), "local" (this machine's devices, e.g. a GPU), or a TPU slice
("v5e:2x2", "v5p:2x2x2", "v5p:4x4x4", "v6e:4x4", ...) described by libtpu on any host: no TPU
needed, but libtpu must be installed (`pip install "jax[tpu]==<jax version>"`, best in its own venv).

For the run config the plan builds abstract params, LoRA, optimizer state and batches carrying the
run's shardings (`jax.ShapeDtypeStruct` + `NamedSharding`: no weights), then AOT-compiles
(`jit(f).trace(...).lower().compile()`) three programs for the topology: the contrastive train step,
the RL update step (value_and_grad of `rl_loss` + optimizer) and the sampler's one-token decode step.
It reports per-device memory (XLA's argument / output / alias / temp sizes) against HBM, FLOPs per
step and an MFU-bound step time = FLOPs / (devices x peak bf16 FLOP/s x assumed MFU).

FLOPs are counted from the jaxpr (every dot_general, loop bodies multiplied by their trip counts,
remat recomputation included); XLA's `cost_analysis()` is shown too, but it counts a `while` body
(our scanned layers) once, so it undercounts a scanned model about layers-fold.

Exit status: 0 all programs fit; 1 a program does not fit (with suggested changes); 3 the mesh
cannot split a tensor or a batch; 4 the topology is not available here.
"""

from elva_jax.plan.cli import main
from elva_jax.plan.flops import jaxpr_flops, xla_flops
from elva_jax.plan.measure import compile_program, plan
from elva_jax.plan.programs import PROGRAMS, Program, decode_program, rl_update_program, train_program
from elva_jax.plan.report import Result, format_report, suggest
from elva_jax.plan.setup import (
    CACHE_AXES,
    Setup,
    Shapes,
    build_setup,
    cache_shardings,
    check_split,
    contrastive_batch,
    kv_cache,
    load_run,
    model_config,
    model_inputs,
    per_device_bytes,
    plan_shapes,
    resolve_model,
    rl_batch,
    rl_batch_shardings,
    with_shardings,
)
from elva_jax.plan.targets import (
    CHIPS,
    EXIT_MESH,
    EXIT_NOT_FIT,
    EXIT_TOPOLOGY,
    GIB,
    GPU_STAND_IN_NOTE,
    Chip,
    PlanError,
    Target,
    cpu_devices,
    resolve_target,
    tpu_devices,
)

__all__ = [
    "CACHE_AXES",
    "CHIPS",
    "EXIT_MESH",
    "EXIT_NOT_FIT",
    "EXIT_TOPOLOGY",
    "GIB",
    "GPU_STAND_IN_NOTE",
    "PROGRAMS",
    "Chip",
    "PlanError",
    "Program",
    "Result",
    "Setup",
    "Shapes",
    "Target",
    "build_setup",
    "cache_shardings",
    "check_split",
    "compile_program",
    "contrastive_batch",
    "cpu_devices",
    "decode_program",
    "format_report",
    "jaxpr_flops",
    "kv_cache",
    "load_run",
    "main",
    "model_config",
    "model_inputs",
    "per_device_bytes",
    "plan",
    "plan_shapes",
    "resolve_model",
    "resolve_target",
    "rl_batch",
    "rl_batch_shardings",
    "rl_update_program",
    "suggest",
    "tpu_devices",
    "train_program",
    "with_shardings",
    "xla_flops",
]
