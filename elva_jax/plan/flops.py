"""FLOPs of a step: matmuls counted from the jaxpr (scanned layers times their count), and XLA's own
cost analysis, which counts a loop body once."""

from __future__ import annotations

import math


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 x output size x contraction size for every dot_general, with scan
    bodies multiplied by their length (while bodies counted once, cond: the costliest branch)."""
    from jax.extend import core as jcore

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_c, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_c)
            continue
        subs = []
        for v in eqn.params.values():
            for x in v if isinstance(v, tuple | list) else (v,):
                if isinstance(x, jcore.ClosedJaxpr):
                    subs.append(x.jaxpr)
                elif isinstance(x, jcore.Jaxpr):
                    subs.append(x)
        if not subs:
            continue
        if name == "cond":
            total += max(jaxpr_flops(s) for s in subs)
        else:
            total += (eqn.params["length"] if name == "scan" else 1) * sum(jaxpr_flops(s) for s in subs)
    return total


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f else None
