"""Run observability: JSONL + TensorBoard scalars, throughput, compile time apart, FLOPs and MFU.

FLOPs per step come from XLA's cost analysis of the compiled step; MFU = achieved FLOP/s / peak,
where the peak is known for the device kind (dense bf16 per chip) or given explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax

# dense bf16 peak FLOP/s per chip, by `device_kind` substring
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for k, v in PEAK_FLOPS.items():
        if k.lower() in kind.lower():
            return v
    return None


def lowered_flops(jitted, *args) -> float | None:
    """FLOPs of one call from XLA's cost analysis of the lowered (not compiled) program.

    XLA counts a while-loop body once, so pass a variant whose layer scans are unrolled
    (`ModelOptions.scan_unroll` >= the layer count); otherwise a scanned model is undercounted by
    about its number of layers.
    """
    try:
        ca = jitted.lower(*args).cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f else None


def unrolled(opts, model_cfg):
    """`opts` with every layer scan fully unrolled (for FLOP counting only)."""
    import dataclasses

    return dataclasses.replace(opts, scan_unroll=max(model_cfg.text.num_layers, model_cfg.vision.depth))


class MetricsLogger:
    """Writes one JSON line per logged step to `metrics.jsonl` and the same scalars to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._f = open(os.path.join(run_dir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                self._tb = None

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        # numbers as floats; strings (e.g. digests of a step's inputs) go to the JSONL only
        clean = {k: (v if isinstance(v, str) else float(v)) for k, v in scalars.items() if v is not None}
        self._f.write(json.dumps({"step": step, **clean}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if not isinstance(v, str):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


class Profiler:
    """Traces steps [first, last] with jax.profiler (TensorBoard / XProf / Perfetto readable)."""

    def __init__(self, run_dir: str, window: tuple[int, ...]):
        self.dir = os.path.join(run_dir, "profile")
        self.window = tuple(window)
        self.active = False

    def step_context(self, step: int):
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(self.dir)
            self.active = True
        ctx = jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()
        return ctx

    def after_step(self, step: int, block_on=None) -> None:
        if self.active and step >= self.window[-1]:
            if block_on is not None:
                jax.block_until_ready(block_on)
            jax.profiler.stop_trace()
            self.active = False
