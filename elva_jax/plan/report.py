"""What a compile tells: per-device memory against HBM, the verdict, config changes that should make a
program fit, and the printed table."""

from __future__ import annotations

import dataclasses

from jax.sharding import AbstractMesh

from elva_jax.model.lora import lora_axes
from elva_jax.model.params import logical_axes
from elva_jax.parallel.sharding import MESH_AXES, MeshError, tree_shardings
from elva_jax.plan.setup import Setup, per_device_bytes, with_shardings
from elva_jax.plan.targets import GIB, GPU_STAND_IN_NOTE, Target


@dataclasses.dataclass
class Result:
    name: str
    note: str
    groups: dict  # label -> per-device bytes of the program's arguments
    hbm: float
    compile_s: float = 0.0
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0  # whole step, all devices (jaxpr count)
    xla_flops_per_device: float | None = None
    step_s: float | None = None  # compute-bound estimate
    read_s: float | None = None  # memory-bound floor: every argument byte read once from HBM
    error: str | None = None  # the compiler's out-of-memory message, or why it was not compiled

    @property
    def total(self) -> int:
        """Peak bytes one device needs: arguments + outputs - donated (aliased) + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.hbm

    @property
    def verdict(self) -> str:
        """'yes', 'tight' (over 90 % of HBM: fragmentation and runtime buffers may not fit) or 'NO'."""
        return "NO" if not self.fits else "tight" if self.total > 0.9 * self.hbm else "yes"


# ----------------------------------------------------------------------------------------------------
# suggestions


def _state_bytes_on(setup: Setup, mesh_shape: tuple[int, int, int], full: bool) -> int | None:
    """Per-device bytes of params + trainable + 2 Adam moments on another mesh shape (None: cannot split)."""
    m = AbstractMesh(mesh_shape, MESH_AXES)
    try:
        p = with_shardings(setup.params, tree_shardings(logical_axes(setup.mcfg), setup.params, m))
        lo = with_shardings(setup.lora, tree_shardings(lora_axes(setup.mcfg, setup.lcfg), setup.lora, m))
    except MeshError:
        return None
    pb, lb = per_device_bytes(p), per_device_bytes(lo)
    return 3 * pb if full else pb + 3 * lb


def suggest(res: Result, setup: Setup, target: Target) -> list[str]:
    """Config changes that should bring a program under HBM, with rough estimates (re-plan to confirm)."""
    run, shp = setup.run, setup.shapes
    data, fsdp, tensor = (setup.mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    full = not run.lora.enabled and res.name == "train"
    hbm, out = res.hbm, []
    state_now = _state_bytes_on(setup, (data, fsdp, tensor), full) or 0
    # 1. move data parallelism into fsdp: same per-device batch, params and optimizer split further
    for k in range(2, data + 1):
        if data % k:
            continue
        new = _state_bytes_on(setup, (data // k, fsdp * k, tensor), full)
        if new is None:
            continue
        est = res.total - state_now + new
        if state_now - new < 0.05 * res.total:
            continue  # not worth it: the state is not what overflows
        if est <= hbm or k == data:
            out.append(
                f"mesh.data={data // k} mesh.fsdp={fsdp * k}: params/optimizer split {fsdp * k * tensor} ways "
                f"(state {state_now / GIB:.1f} -> {new / GIB:.1f} GiB/device; est. total {est / GIB:.1f} GiB)"
            )
            break
    if not run.model.remat and res.name != "decode":
        out.append("model.remat=true: recompute each layer in the backward pass (activations ~layers-fold smaller)")
    p = res.groups.get("params", 0)
    if run.lora.enabled and run.model.param_dtype == "float32" and p > 0.1 * res.total:
        out.append(
            f"model.param_dtype=bfloat16: the frozen base needs no fp32 copy with LoRA "
            f"(params {p / GIB:.1f} -> {p / 2 / GIB:.1f} GiB/device)"
        )
    if res.name == "train" and res.temp > 0.2 * hbm:
        per_device = shp.b // (data * fsdp)  # rows of a micro-batch on one device
        ks = [k for k in range(2, per_device + 1) if per_device % k == 0]
        est_k = lambda k: res.total - res.temp * (1 - 1 / k)  # noqa: E731 - temporaries ~ micro-batch size
        k = next((k for k in ks if est_k(k) <= hbm), ks[-1] if ks else None)
        if k:
            t = res.temp / GIB
            out.append(
                f"train.micro_batches={shp.A * k}: micro-batch {shp.b} -> {shp.b // k} rows (exact accumulation; "
                f"temporaries ~{t:.1f} -> ~{t / k:.1f} GiB, est. total {est_k(k) / GIB:.1f} GiB)"
            )
    embed_rl = setup.embedder is not None
    if res.name in ("rl_update", "decode"):
        micro = run.rl.micro_instances
        out.append(
            f"fewer RL rows per pass: rl.micro_instances (now {micro or 'all'} of {shp.I} instances per sampler "
            f"call and gradient micro-batch; exact accumulation)"
            if embed_rl and micro != 1
            else f"fewer RL rows per step: --rl-instances{'' if embed_rl else ' / --rl-candidates'} (now {shp.N} = "
            f"{shp.I}x{shp.S}x{shp.G}), or a shorter prompt (--seq {shp.P})"
        )
        shards = data * fsdp
        if shp.I > 1 and shp.S % shards and not embed_rl:  # Embed-RL's S = 2 is fixed
            c = -(-shp.S // shards) * shards - 1
            out.append(
                f"{shp.I} instances is the fewest whose I x S prompts split over data x fsdp = {shards}; with "
                f"--rl-candidates {c} (S = {c + 1}) one instance splits"
            )
    if res.name == "embed":
        e = run.embed_rl
        rows = e.embedder_micro_rows or shp.N
        shards = data * fsdp
        ok = [k for k in range(shards, rows, shards) if shp.N % k == 0]
        if ok:
            out.append(
                f"embed_rl.embedder_micro_rows={ok[0]}: the embedder takes {ok[0]} of the step's {shp.N} rows per "
                f"call (now {rows}; a multiple of data x fsdp = {shards} that divides {shp.N})"
            )
        out.append(f"shorter embedder rows: embed_rl.embedder_seq_buckets (now up to {max(e.embedder_seq_buckets)})")
    out.append(f"a larger slice: per-device state and batch shrink with more devices (now {len(target.devices)})")
    return out


# ----------------------------------------------------------------------------------------------------
# formatting


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_report(results: list[Result], target: Target, mfu: float) -> str:
    hdr = (
        f"{'program':<10} {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'total':>7} {'HBM':>6} {'fits':>5} "
        f"{'compile':>8} {'TFLOP/step':>11} {'XLA GFLOP/dev':>13} {'@' + format(mfu, '.0%') + ' MFU':>10} "
        f"{'HBM read':>9}"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        xla = f"{r.xla_flops_per_device / 1e9:.1f}" if r.xla_flops_per_device else "n/a"
        lines.append(
            f"{r.name:<10} {gib(r.argument):>7} {gib(r.output):>7} {gib(r.alias):>7} {gib(r.temp):>7} "
            f"{gib(r.total):>7} {gib(r.hbm):>6} {r.verdict:>5} {r.compile_s:>7.1f}s {r.flops / 1e12:>11.2f} "
            f"{xla:>13} {_dur(r.step_s):>10} {_dur(r.read_s):>9}"
        )
    lines.append(
        "memory: GiB per device from XLA's memory_analysis (total = args + output - alias + temp + code; args "
        "include inputs the program never reads, which stay resident)"
    )
    if target.stand_in:
        lines.append(
            f"  NOTE: compiled by {target.stand_in} on {len(target.devices)} fake devices for {target.chip.name}: "
            f"{GPU_STAND_IN_NOTE}"
        )
    for r in results:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in r.groups.items())
        lines.append(f"  {r.name}: {r.note}; arguments per device: {parts}")
    peak, bw = target.peak_per_device, target.bw_per_device
    lines.append(
        "time: '@MFU' = jaxpr matmul FLOPs of the whole step (scanned layers x their count, remat recompute "
        f"included) / ({len(target.devices)} devices x "
        + (f"{peak / 1e12:g} TFLOP/s bf16 peak" if peak else "unknown peak: pass --peak-tflops")
        + f" x {mfu:.0%} assumed MFU); 'HBM read' = argument bytes / "
        + (f"{bw / 1e9:g} GB/s" if bw else "unknown bandwidth")
        + " (the floor for memory-bound programs such as decode). XLA's cost_analysis counts a scanned body once."
    )
    return "\n".join(lines)
