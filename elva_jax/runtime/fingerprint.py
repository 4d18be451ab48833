"""The settings that give a checkpoint's step and data position their meaning (mesh-independent).

A resume whose settings differ in one of these fields stops (`CheckpointIncompatible`) unless the field
is named in `run.allow_changed`. Mesh, dtypes of compute, logging and checkpoint cadence may change
freely: they do not change what step s or record index i means.

Which fields count is marked once, in the schema: a field's ``metadata["fingerprint"]`` names the
checkpoint kinds it belongs to (`STAGE_KEYS`), or every kind (`configlib.FINGERPRINT_ALL`).
"""

from __future__ import annotations

import dataclasses

from elva_jax.configlib import FINGERPRINT_ALL
from elva_jax.schema import RunConfig, field_value

#: the checkpoint kinds: the three stages, and Embed-RL's RL stage and warm start (their own keys, so that ELVA's
#: checkpoints keep resuming when Embed-RL fields change)
STAGE_KEYS = ("contrastive", "sft", "rl", "embed_rl", "embed_rl_sft")


def fingerprint_fields(stage: str) -> tuple[str, ...]:
    """The dotted fields of `RunConfig` marked for checkpoint kind ``stage``."""
    if stage not in STAGE_KEYS:
        raise KeyError(f"unknown checkpoint kind {stage!r}; one of {STAGE_KEYS}")
    out = []
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else type(section.default)):
            marks = f.metadata.get("fingerprint", ())
            if marks == FINGERPRINT_ALL or stage in marks:
                out.append(f"{section.name}.{f.name}")
    return tuple(out)


FIELDS = {stage: fingerprint_fields(stage) for stage in STAGE_KEYS}


def run_fingerprint(cfg, stage: str) -> dict:
    """{dotted field: value} of the stage's fingerprint fields (tuples as lists, as JSON stores them)."""
    out = {}
    for name in FIELDS[stage]:
        v = field_value(cfg, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out
