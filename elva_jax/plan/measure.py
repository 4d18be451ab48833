"""Build, compile and measure: `plan(run, target)` AOT-compiles the programs for the target and returns a
JSON-able report."""

from __future__ import annotations

import dataclasses
import re
import time

from elva_jax.configlib import ConfigError
from elva_jax.model.params import count_params
from elva_jax.parallel.sharding import MeshError, make_mesh
from elva_jax.plan.flops import jaxpr_flops, xla_flops
from elva_jax.plan.programs import PROGRAMS, Program
from elva_jax.plan.report import Result, format_report, gib, suggest
from elva_jax.plan.setup import (
    build_setup,
    is_embed_rl,
    per_device_bytes,
    plan_shapes,
    resolve_embedder,
    resolve_model,
)
from elva_jax.plan.targets import PlanError, Target

_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def compile_program(prog: Program, target: Target, mfu: float) -> Result:
    """Trace (count FLOPs), lower and compile for the target; an out-of-memory compile is a result too."""
    groups = {k: per_device_bytes(v) for k, v in prog.groups.items() if v is not None}
    res = Result(prog.name, prog.note, groups, target.hbm_per_device)
    args_bytes = sum(groups.values())
    if args_bytes > res.hbm:  # the arguments alone overflow: no need to spend minutes compiling
        res.argument, res.error = args_bytes, "not compiled: the arguments alone exceed HBM"
        return res
    t0 = time.perf_counter()
    traced = prog.fn.trace(*prog.args)
    res.flops = jaxpr_flops(traced.jaxpr.jaxpr)
    peak = target.peak_per_device
    res.step_s = res.flops / (len(target.devices) * peak * mfu) if peak else None
    res.read_s = args_bytes / target.bw_per_device if target.bw_per_device else None
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that cannot fit
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        m = _OOM.search(msg)
        res.argument = args_bytes
        if m:
            res.temp = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
        res.error, res.compile_s = msg.strip().splitlines()[-1][:300], time.perf_counter() - t0
        return res
    res.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    size = lambda k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) if ma is not None else 0  # noqa: E731
    res.output, res.alias, res.temp, res.code = size("output"), size("alias"), size("temp"), size("generated_code")
    # XLA leaves inputs the program never reads (the vision tower in decode) out of its argument size;
    # they stay resident on the device all the same
    res.argument = max(size("argument"), args_bytes)
    res.xla_flops_per_device = xla_flops(compiled)
    return res


def plan(
    run,
    target: Target,
    *,
    model: str = "auto",
    batch: int | None = None,
    seq: int | None = None,
    text_only: bool = False,
    rl_instances: int = 0,
    rl_candidates: int = 0,
    rl_group: int = 0,
    programs: tuple[str, ...] = tuple(PROGRAMS),
    mfu: float = 0.4,
    embedder_model: str = "auto",
    log=print,
) -> dict:
    """Build, compile and measure; returns a JSON-able report (raises PlanError on mesh/shape errors)."""
    mcfg, model_desc = resolve_model(run, model)
    emb_mcfg = emb_desc = None
    if is_embed_rl(run):
        if getattr(run.embed_rl, "prm_enabled", False):
            raise ConfigError(
                "embed_rl.prm_enabled: the judge (a third model) is not in the plan yet; "
                "plan embed_rl.prm_enabled=false"
            )
        emb_mcfg, emb_desc = resolve_embedder(run, embedder_model)
    try:
        mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=target.devices)
    except MeshError as e:
        raise PlanError(f"mesh: {e}") from None
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    shapes = plan_shapes(
        run,
        sizes["data"] * sizes["fsdp"],
        batch=batch,
        seq=seq,
        text_only=text_only,
        rl_instances=rl_instances,
        rl_candidates=rl_candidates,
        rl_group=rl_group,
    )
    setup = build_setup(run, mcfg, mesh, shapes, emb_mcfg)
    n_params = count_params(setup.params)
    m = run.model
    log(f"target  {target.describe()}")
    log(
        f"model   {model_desc}: {n_params / 1e9:.2f}B params ({m.param_dtype}), compute {m.dtype}, "
        f"remat {'on' if m.remat else 'off'}, "
        + (f"LoRA r{run.lora.rank} on {','.join(run.lora.targets)}" if run.lora.enabled else "full fine-tuning")
    )
    if setup.embedder is not None:
        n_emb = count_params(setup.embedder[1])
        log(f"embedder {emb_desc}: {n_emb / 1e9:.2f}B params ({m.param_dtype}), frozen, on the same mesh")
    log(f"mesh    data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']}")
    results, failures = [], {}
    for name in programs:
        prog = PROGRAMS[name](setup)
        log(f"compile {name} ({prog.note}) ...")
        res = compile_program(prog, target, mfu)
        if res.error:
            log(f"        {res.error}")
        results.append(res)
        if not res.fits:
            failures[name] = suggest(res, setup, target)
    log("")
    log(format_report(results, target, mfu))
    report = {
        "topology": target.topology,
        "devices": len(target.devices),
        "chips": target.n_chips,
        "chip": target.chip.name,
        "compiled_by": target.stand_in,
        "temp_is_estimate": bool(target.stand_in),
        "hbm_bytes_per_device": target.hbm_per_device,
        "peak_flops_per_device": target.peak_per_device,
        "assumed_mfu": mfu,
        "model": model_desc,
        "params": n_params,
        **(
            {"embedder": emb_desc, "embedder_params": count_params(setup.embedder[1])}
            if setup.embedder is not None
            else {}
        ),
        "mesh": sizes,
        "shapes": dataclasses.asdict(shapes),
        "programs": {
            r.name: {
                **{k: getattr(r, k) for k in ("note", "compile_s", "argument", "output", "alias", "temp", "code")},
                "total": r.total,
                "fits": r.fits,
                "verdict": r.verdict,
                "flops": r.flops,
                "xla_flops_per_device": r.xla_flops_per_device,
                "est_step_s": r.step_s,
                "hbm_read_s": r.read_s,
                "error": r.error,
                "arguments_per_device": r.groups,
            }
            for r in results
        },
        "fits": not failures,
        "suggestions": failures,
    }
    if failures:
        log("")
        for name, sug in failures.items():
            r = next(x for x in results if x.name == name)
            need = f"needs {gib(r.total)} GiB per device" if r.total else "does not compile"
            log(
                f"DOES NOT FIT: {name} {need}, {target.chip.name} has {gib(r.hbm)} GiB"
                + (f" ({r.error})" if r.error else "")
                + ". Try (then re-plan):"
            )
            for s in sug:
                log(f"  - {s}")
    return report
