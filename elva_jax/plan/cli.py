"""Pod-scale plans proven by ahead-of-time compilation: does a run fit a topology, and how fast could it go?

    python -m elva_jax.plan --config configs/qwen2vl_7b_mbeir.yaml --topology v5p:2x2x2 \\
        [--mesh data=1,fsdp=8,tensor=1] [--batch N] [--seq L] [--json out.json] [key.sub=value ...]
    python -m elva_jax.plan --dump-goldens tests/goldens      # rewrite the golden sharding dumps

Topologies: "cpu:N" (N fake CPU devices), "local" (the host's own devices, e.g. a GPU), or a TPU slice
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

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from elva_jax.plan.goldens import dump_goldens
from elva_jax.plan.measure import plan
from elva_jax.plan.programs import PROGRAMS
from elva_jax.plan.setup import load_run
from elva_jax.plan.targets import EXIT_NOT_FIT, PlanError, resolve_target
from elva_jax.schema import check_plan_available


def _parse_mesh(text: str) -> list[str]:
    out = []
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in ("data", "fsdp", "tensor") or not v.strip().lstrip("-").isdigit():
            raise PlanError(f"--mesh {text!r}: expected data=..,fsdp=..,tensor=.. (integers, one may be -1)")
        out.append(f"mesh.{k.strip()}={int(v)}")
    return out


def stage_programs(run) -> tuple[str, ...]:
    """The programs the run's stages compile (a contrastive-only preset also gets the RL programs at the
    paper's RL sizes, as a preview of its stage 3)."""
    stages = run.train.stages
    out = ("train",) if "contrastive" in stages else ()
    if "rl" in stages and run.rl.recipe == "embed_rl":  # the reasoner's update and decode, the embedder's pass
        return out + ("rl_update", "decode", "embed")
    return out + ("rl_update", "decode") if "rl" in stages or out else out


def main(argv=None) -> int:
    doc = __doc__  # the help text
    ap = argparse.ArgumentParser(
        prog="python -m elva_jax.plan",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    ap.add_argument("--config", help="run config (configs/*.yaml)")
    ap.add_argument("--topology", help="cpu:N | local | v5e:2x2 | v5p:2x2x2 | v5p:4x4x4 | v6e:4x4 | ...")
    ap.add_argument("--mesh", default="", help="data=..,fsdp=..,tensor=.. (overrides the config's mesh)")
    ap.add_argument("--batch", type=int, help="global batch (default train.global_batch)")
    ap.add_argument(
        "--seq",
        type=int,
        help="sequence / prompt length (default max(data.seq_buckets); RL runs: max(rl.prompt_buckets))",
    )
    ap.add_argument(
        "--model", default="auto", help="auto | 2b | 7b | qwen3vl_2b | qwen3vl_8b | or any elva_jax.model.tiny preset"
    )
    ap.add_argument(
        "--embedder-model",
        default="auto",
        help="rl.recipe=embed_rl: the frozen embedder's sizes, as --model (auto: embed_rl.embedder_checkpoint's)",
    )
    ap.add_argument(
        "--programs",
        default="",
        help="comma list of " + ",".join(PROGRAMS) + " (default: the run's stages: contrastive -> train, "
        "rl -> rl_update,decode, Embed-RL's rl -> rl_update,decode,embed)",
    )
    ap.add_argument("--text-only", action="store_true", help="no image patch arrays in the batches")
    ap.add_argument(
        "--rl-instances",
        type=int,
        default=0,
        help="RL instances per step (0: rl.instances_per_step for RL runs, else the fewest that split)",
    )
    ap.add_argument(
        "--rl-candidates",
        type=int,
        default=0,
        help="candidates per instance (0: 1 + rl.num_hard_negatives + rl.num_random_negatives)",
    )
    ap.add_argument("--rl-group", type=int, default=0, help="rollouts per instance G (0: rl.group_size)")
    ap.add_argument("--hbm-gib", type=float, help="HBM per device to plan against (default: the chip's)")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per device (default: the chip's)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step-time estimate")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--dump-goldens", metavar="DIR", help="write the golden sharding dumps to DIR and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value run-config overrides, e.g. model.remat=false")
    a = ap.parse_args(argv)
    if a.dump_goldens:
        for p in dump_goldens(a.dump_goldens):
            print(f"wrote {p}")
        return 0
    if not a.config or not a.topology:
        ap.error("--config and --topology are required (or --dump-goldens DIR)")
    try:
        if a.topology.split(":")[0].lower() != "local":
            # fake CPU devices / a described TPU slice: never start an accelerator backend here, and let
            # several plans load libtpu at once (it only compiles; no chip is claimed)
            jax.config.update("jax_platforms", "cpu")
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        target = resolve_target(a.topology, hbm_gib=a.hbm_gib, peak_tflops=a.peak_tflops)
        run = load_run(a.config, _parse_mesh(a.mesh) + list(a.overrides))
        check_plan_available(run)  # its RL programs would be another recipe's
        programs = tuple(p.strip() for p in a.programs.split(",") if p.strip()) or stage_programs(run)
        bad = [p for p in programs if p not in PROGRAMS]
        if bad:
            raise PlanError(f"unknown programs {bad}; choose from {list(PROGRAMS)}")
        print(f"plan    {a.config}")
        report = plan(
            run,
            target,
            model=a.model,
            batch=a.batch,
            seq=a.seq,
            text_only=a.text_only,
            rl_instances=a.rl_instances,
            rl_candidates=a.rl_candidates,
            rl_group=a.rl_group,
            programs=programs,
            mfu=a.mfu,
            embedder_model=a.embedder_model,
        )
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    report["config"] = a.config
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if not report["fits"]:
        sys.stdout.flush()
        print(f"error: the plan does not fit {a.topology} (see the suggestions above)", file=sys.stderr)
        return EXIT_NOT_FIT
    return 0
