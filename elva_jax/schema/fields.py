"""Reading a config by field: dotted names, projections onto smaller configs."""

from __future__ import annotations

import dataclasses


def field_value(c, dotted: str):
    """The value of a dotted field ("train.global_batch") of a config."""
    for k in dotted.split("."):
        c = getattr(c, k)
    return c


def project(cls, section, **extra):
    """``cls(**fields)`` with every field of the dataclass ``cls`` that ``section`` also has taken from
    it (plus ``extra``): a smaller config read off the run schema without copying fields by hand."""
    names = {f.name for f in dataclasses.fields(cls)}
    vals = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
    return cls(**{**vals, **extra})
