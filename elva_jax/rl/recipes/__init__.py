"""RL recipes, one module each, chosen by ``rl.recipe``: ``elva`` (the embedder is the policy) and ``embed_rl``
(a reasoner trained against a frozen embedder). Each has ``run_stage(cfg, root, mcfg, params, tokenizer, *,
embed)`` returning `run_rl`'s result (plus ``params`` and ``summary`` when the stage finished) and the
export record of what it trains (``TRAINED_BY``, ``EMBEDDING``)."""

from __future__ import annotations

from types import ModuleType

from elva_jax.rl.recipes import elva, embed_rl

RECIPES: dict[str, ModuleType] = {"elva": elva, "embed_rl": embed_rl}


def recipe(name: str) -> ModuleType:
    """The recipe module of ``rl.recipe`` ``name``."""
    if name not in RECIPES:
        raise KeyError(f"unknown RL recipe {name!r}; one of {sorted(RECIPES)}")
    return RECIPES[name]
