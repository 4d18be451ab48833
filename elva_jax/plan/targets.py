"""Chips and topologies: which devices a plan compiles for, and their HBM, peak FLOP/s and bandwidth.

TPU slices are described by libtpu (no TPU needed); "cpu:N" are fake CPU devices; "h100:N" / "h200:N" compile
on N fake CPU devices with the GPU's numbers (XLA:CPU stands in for XLA:GPU, see GPU_STAND_IN_NOTE);
"local" is whatever the host has.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from elva_jax.errors import UserError

GIB = 1024**3
EXIT_NOT_FIT, EXIT_MESH, EXIT_TOPOLOGY = 1, 3, 4


class PlanError(UserError, RuntimeError):
    """A plan that cannot be built; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_MESH):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------
# chips and topologies


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # per chip
    peak_flops: float | None  # dense bf16 FLOP/s per chip
    hbm_bw: float | None = None  # HBM bytes/s per chip


CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32, 918e12, 1640e9),
    "h100": Chip("NVIDIA H100", 80, 989e12, 3350e9),
    "h200": Chip("NVIDIA H200", 141, 989e12, 4800e9),
    "cpu": Chip("CPU (pretend HBM)", 16, None),
}
# device_kind substring -> chip (for --topology local)
_KINDS = (
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v4", "v4"),
    ("h100", "h100"),
    ("h200", "h200"),
)


@dataclasses.dataclass
class Target:
    topology: str
    devices: list
    chip: Chip
    n_chips: int
    # set when the programs are compiled by another backend standing in for the chip's (GPU plans on XLA:CPU)
    stand_in: str | None = None

    @property
    def hbm_per_device(self) -> float:
        """Bytes of HBM one device (one JAX device: a chip, or a core of a 2-core v4 chip) may use."""
        return self.chip.hbm_gib * GIB * self.n_chips / len(self.devices)

    @property
    def peak_per_device(self) -> float | None:
        p = self.chip.peak_flops
        return p * self.n_chips / len(self.devices) if p else None

    @property
    def bw_per_device(self) -> float | None:
        b = self.chip.hbm_bw
        return b * self.n_chips / len(self.devices) if b else None

    def describe(self) -> str:
        n = len(self.devices)
        per = f"{self.hbm_per_device / GIB:g} GiB HBM each"
        out = f"{self.topology}: {n} device(s) on {self.n_chips} x {self.chip.name}, {per}"
        return out + (f"; compiled by {self.stand_in} ({GPU_STAND_IN_NOTE})" if self.stand_in else "")


# what a GPU plan compiled on fake CPU devices can and cannot tell
GPU_STAND_IN_NOTE = (
    "argument and output sizes are exact (same shapes and shardings as on the GPUs); temporaries come from "
    "XLA:CPU's buffer assignment and are an estimate of what XLA:GPU allocates"
)


def cpu_devices(n: int) -> list:
    """N fake CPU devices; only possible before JAX's backends start (a fresh process)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already up: use what it has
    devs = jax.devices("cpu")
    if len(devs) < n:
        raise PlanError(
            f"topology cpu:{n} needs {n} fake CPU devices, but JAX's CPU backend already started with "
            f"{len(devs)}; run the plan in a fresh process (python -m elva_jax.plan ...)",
            EXIT_TOPOLOGY,
        )
    return devs[:n]


def tpu_devices(topology: str) -> list:
    """Devices of a TPU slice described by libtpu (works on a host without TPUs)."""
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown name
        raise PlanError(
            f"cannot describe TPU topology {topology!r} here ({type(e).__name__}: {e}). AOT compilation for TPUs "
            f'needs libtpu: pip install "jax[tpu]=={jax.__version__}" (best in a separate venv), or plan on fake '
            f"CPU devices with --topology cpu:N",
            EXIT_TOPOLOGY,
        ) from None
    return list(desc.devices)


def resolve_target(topology: str, *, hbm_gib: float | None = None, peak_tflops: float | None = None) -> Target:
    """'cpu:N' | 'local' | '<tpu generation>:<AxB[xC]>' -> devices and chip facts (overridable)."""
    kind, _, shape = topology.lower().partition(":")
    if kind == "cpu":
        n = int(shape or 1)
        devices, chip, chips = cpu_devices(n), CHIPS["cpu"], n
    elif kind == "local":
        devices = jax.devices()
        dk = devices[0].device_kind.lower()
        key = next((c for s, c in _KINDS if s in dk), "cpu" if devices[0].platform == "cpu" else None)
        chip = CHIPS[key] if key else Chip(devices[0].device_kind, 0, None)
        chips = len(devices)
    elif kind in ("h100", "h200"):
        # no GPU compiler here: N fake CPU devices with the GPU's HBM and peak (see GPU_STAND_IN_NOTE)
        if not re.fullmatch(r"\d+", shape or ""):
            raise PlanError(f"GPU topology {topology!r} must name the GPU count, e.g. {kind}:8", EXIT_TOPOLOGY)
        n = int(shape)
        devices, chip, chips = cpu_devices(n), CHIPS[kind], n
    elif kind in CHIPS and kind != "cpu":
        if not re.fullmatch(r"\d+(x\d+)+", shape):
            raise PlanError(f"TPU topology {topology!r} must look like {kind}:2x2 or {kind}:2x2x2", EXIT_TOPOLOGY)
        devices, chip = tpu_devices(f"{kind}:{shape}"), CHIPS[kind]
        chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
    else:
        raise PlanError(
            f"unknown topology {topology!r}: use cpu:N, local, h100:N / h200:N (N GPUs, compiled on fake CPU "
            f"devices), or a TPU slice such as v5e:2x2, v5p:2x2x2, v5p:4x4x4, v6e:4x4",
            EXIT_TOPOLOGY,
        )
    if hbm_gib is not None:
        chip = dataclasses.replace(chip, hbm_gib=hbm_gib * len(devices) / chips)
    if peak_tflops is not None:
        chip = dataclasses.replace(chip, peak_flops=peak_tflops * 1e12)
    if not chip.hbm_gib:
        raise PlanError(f"unknown HBM size for {chip.name}; pass --hbm-gib", EXIT_TOPOLOGY)
    stand_in = "XLA:CPU" if kind in ("h100", "h200") else None
    return Target(topology, devices, chip, chips, stand_in)
