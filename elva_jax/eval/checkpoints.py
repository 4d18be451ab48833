"""The model an evaluation embeds with: a checkpoint or run directory resolved to its transformers export, the
embedding mode its export record asks for, what names its weights in the cache fingerprint, and the load."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from elva_jax.model.hf_checkpoint import EXPORT_INFO, read_export_info
from elva_jax.runtime import models
from elva_jax.schema import EMBED_MODES, RunConfig

__all__ = ["checkpoint_identity", "load_model", "resolve_checkpoint", "resolve_mode"]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None, int | None]:
    """(transformers model dir, run dir or None, step or None) of a checkpoint dir or a run dir."""
    p = Path(path)
    if (p / "config.json").is_file():
        model_dir = p
    elif (p / "export" / "config.json").is_file():
        model_dir = p / "export"
    else:
        raise FileNotFoundError(
            f"{p}: neither a transformers checkpoint (config.json + *.safetensors) nor a run dir with export/"
        )
    run_dir = model_dir.parent if model_dir.name == "export" and (model_dir.parent / "config.yaml").is_file() else None
    step = None
    if run_dir is not None and (run_dir / "summary.json").is_file():
        try:
            s = json.loads((run_dir / "summary.json").read_text())
            step = s.get("end_step", s.get("steps"))
        except (OSError, ValueError):
            step = None
    return model_dir, run_dir, step


def resolve_mode(mode: str, model_dir: Path | None) -> tuple[str, str]:
    """(embedding mode, why) for ``eval.mode``: an explicit mode as given; "auto" from the checkpoint's export
    record (``elva_export.json``: "ret" after the RL stage, else the contrastive stage's embedding), "eol"
    without one."""
    if mode != "auto":
        return mode, "eval.mode / --mode"
    info = read_export_info(model_dir) if model_dir is not None else None
    if not info:
        return "eol", f"auto: no {EXPORT_INFO} with the checkpoint, LamRA's EOL"
    emb = info.get("embedding")
    chosen = emb if emb in EMBED_MODES else "eol"
    return chosen, f"auto: {EXPORT_INFO} says trained by the {info.get('trained_by')} stage with {emb}"


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checkpoint_identity(model_dir: Path, step: int | None) -> dict:
    """What names the weights in the cache fingerprint: their content (CRC-32 of every safetensors file,
    about 1 GB/s, so seconds for a 7B), not their path, size or modification time, which a swap of
    weights at the same path can keep."""
    weights = sorted(
        [f.name, f.stat().st_size, _file_crc(f)] for f in model_dir.iterdir() if f.suffix == ".safetensors"
    )
    return {"checkpoint": str(model_dir.resolve()), "step": step, "weights": weights}


def load_model(cfg: RunConfig, model_dir: Path):
    """(model config, params, tokenizer) of a transformers checkpoint at ``cfg.model.param_dtype``, with the
    tokenizer of ``model.tokenizer`` (:func:`elva_jax.runtime.models.load_model`)."""
    return models.load_model(str(model_dir), tokenizer=cfg.model.tokenizer, param_dtype=cfg.model.param_dtype)
