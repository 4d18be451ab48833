"""Import / export transformers checkpoints of any supported family (config.json + safetensors).

Import reads tensor by tensor through a memory map, so with a `shardings` pytree every device shard is
read straight from disk (`jax.make_array_from_callback`): a 7B never needs a full host copy.
(safetensors' own numpy loader cannot slice bf16 tensors lazily; the file format is a JSON header
plus raw little-endian bytes, so a memory map gives zero-copy slices of any dtype.)
Export writes the names transformers itself saves with `safetensors.numpy`; import -> export -> import is
bit-exact in the stored dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from elva_jax.errors import UserError
from elva_jax.model.config import ModelConfig
from elva_jax.model.families import family_of, read_model_config
from elva_jax.model.params import ParamSpec, get_path, param_specs, set_path

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model: missing tensor, wrong shape, bad file."""


class SafetensorsDir:
    """Lazy, memory-mapped view of every tensor in a checkpoint directory (name -> np.ndarray view)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for fn in files:
            full = os.path.join(path, fn)
            if not os.path.exists(full):
                raise CheckpointError(f"{index}: lists {fn}, which does not exist")
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                try:
                    header = json.loads(f.read(n))
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{full}: corrupt safetensors header ({e})") from None
            for name, meta in header.items():
                if name != "__metadata__":
                    self._where[name] = (full, meta, 8 + n)
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        full, meta, base = self._where[name]
        if full not in self._maps:
            self._maps[full] = np.memmap(full, dtype=np.uint8, mode="r")
        dt = _DTYPES.get(meta["dtype"])
        if dt is None:
            raise CheckpointError(f"{full}: tensor {name} has unsupported dtype {meta['dtype']}")
        lo, hi = meta["data_offsets"]
        raw = self._maps[full][base + lo : base + hi]
        return raw.view(dt).reshape(meta["shape"])


def _resolve(st: SafetensorsDir, name: str, prefixes) -> str | None:
    if name in st:
        return name
    for disk, alt in prefixes:
        if name.startswith(disk) and alt + name[len(disk) :] in st:
            return alt + name[len(disk) :]
    return None


def _to_jax_layout(x: np.ndarray, spec: ParamSpec, cfg: ModelConfig) -> np.ndarray:
    if spec.layout == "linear":
        return x.T
    if spec.layout == "patch":
        return x.reshape(x.shape[0], -1).T
    return x


def _from_jax_layout(x: np.ndarray, spec: ParamSpec, cfg: ModelConfig) -> np.ndarray:
    if spec.layout == "linear":
        return np.ascontiguousarray(x.T)
    if spec.layout == "patch":
        v = cfg.vision
        return np.ascontiguousarray(
            x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        )
    return np.ascontiguousarray(x)


def load_params(
    path: str,
    cfg: ModelConfig | None = None,
    *,
    dtype=jnp.float32,
    shardings: dict | None = None,
) -> tuple[ModelConfig, dict]:
    """Read a transformers checkpoint directory of a supported family into (config, params pytree).

    dtype: the params' storage dtype (cast per tensor). shardings: optional pytree of
    `jax.sharding.Sharding` with the params' structure; each shard is then read from disk on its own.
    Raises CheckpointError naming the tensor for a missing tensor or a shape mismatch.
    """
    cfg = cfg or read_model_config(path)
    st = SafetensorsDir(path)
    params: dict = {}
    used: set[str] = set()
    specs = param_specs(cfg)
    for spec in specs:
        n_layers = spec.shape[0] if spec.stacked else 1
        names = [spec.hf_name.format(i=i) for i in range(n_layers)]
        resolved = []
        for nm in names:
            r = _resolve(st, nm, family_of(cfg).alternate_prefixes)
            if r is None:
                raise CheckpointError(f"{path}: tensor {nm!r} is missing (needed for {'/'.join(spec.path)})")
            got = tuple(st[r].shape)
            want = _from_jax_layout(np.zeros(spec.layer_shape, np.float32), spec, cfg).shape
            if got != tuple(want):
                raise CheckpointError(
                    f"{path}: tensor {r!r} has shape {got}, expected {tuple(want)} for config {cfg.text.hidden_size=}"
                )
            resolved.append(r)
            used.add(r)

        def read(index, spec=spec, resolved=resolved):
            if spec.stacked:
                li = range(spec.shape[0])[index[0]] if index else range(spec.shape[0])
                rest = tuple(index[1:]) if index else ()
                return np.stack([np.asarray(_to_jax_layout(st[resolved[i]], spec, cfg)[rest], dtype) for i in li])
            return np.asarray(_to_jax_layout(st[resolved[0]], spec, cfg)[tuple(index or ())], dtype)

        if shardings is not None:
            sh = get_path(shardings, spec.path)
            arr = jax.make_array_from_callback(spec.shape, sh, read)
        else:
            arr = jnp.asarray(read(()))
        set_path(params, spec.path, arr)
    if cfg.tie_word_embeddings:
        used.update(n for n in ("lm_head.weight",) if n in st)
    unexpected = sorted(set(st.keys()) - used)
    if unexpected:
        warnings.warn(
            f"{path}: {len(unexpected)} tensors are not part of the model and were not loaded: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
            stacklevel=2,
        )
    return cfg, params


def save_params(
    path: str,
    params: dict,
    cfg: ModelConfig,
    *,
    max_shard_bytes: int = 4 << 30,
    extra_files_from: str | None = None,
) -> None:
    """Write params as a transformers directory of the config's family (config.json + safetensors [+ index]).

    Tensors keep the params' dtype. extra_files_from: copy tokenizer / processor files from there.
    Refuses (CheckpointError, nothing written) a tensor with a NaN or an infinity.
    """
    tensors: dict[str, np.ndarray] = {}
    for spec in param_specs(cfg):
        x = np.asarray(jax.device_get(get_path(params, spec.path)))
        if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x.astype(np.float32, copy=False))))
            if bad:
                raise CheckpointError(
                    f"refusing to export {path}: tensor {'/'.join(spec.path)} ({spec.hf_name}) has {bad} "
                    "non-finite values"
                )
        if spec.stacked:
            for i in range(spec.shape[0]):
                tensors[spec.hf_name.format(i=i)] = _from_jax_layout(x[i], spec, cfg)
        else:
            tensors[spec.hf_name] = _from_jax_layout(x, spec, cfg)
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    for fn in os.listdir(path):
        if fn.endswith(".safetensors") or fn == "model.safetensors.index.json":
            os.remove(os.path.join(path, fn))
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(sh, os.path.join(path, fn), metadata=meta)
            weight_map.update({k: fn for k in sh})
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    raw = json.loads(json.dumps(cfg.raw)) if cfg.raw else {}
    if not raw:
        raise ValueError("config has no raw config.json content to export")
    dt = np.dtype(np.asarray(jax.device_get(params["text"]["norm"]["scale"])).dtype)
    raw["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dt.name, "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    if extra_files_from:
        for fn in os.listdir(extra_files_from):
            if fn.endswith((".json", ".txt", ".model", ".jinja")) and fn not in (
                "config.json",
                "model.safetensors.index.json",
            ):
                shutil.copy(os.path.join(extra_files_from, fn), os.path.join(path, fn))


def resize_vocab(params: dict, cfg: ModelConfig, new_size: int) -> tuple[dict, ModelConfig]:
    """Resize the token table (and an untied LM head) to `new_size` rows, as transformers'
    `resize_token_embeddings(new_size)` does: shrinking keeps the first rows; growing copies the old
    rows and fills the new ones with the mean of the old rows (computed in fp32).

    transformers draws the new rows from N(mean, 1e-9 * cov), i.e. the mean up to ~3e-5 of the
    embedding spread; we use the mean itself so the result is deterministic.
    """
    t = params["text"]

    def resize(w: jnp.ndarray, axis: int) -> jnp.ndarray:
        old = w.shape[axis]
        if new_size <= old:
            return jax.lax.slice_in_dim(w, 0, new_size, axis=axis)
        mean = jnp.mean(w.astype(jnp.float32), axis=axis, keepdims=True).astype(w.dtype)
        reps = [1] * w.ndim
        reps[axis] = new_size - old
        return jnp.concatenate([w, jnp.tile(mean, reps)], axis=axis)

    new_t = dict(t)
    new_t["embed_tokens"] = {"embedding": resize(t["embed_tokens"]["embedding"], 0)}
    if not cfg.tie_word_embeddings:
        new_t["lm_head"] = {"kernel": resize(t["lm_head"]["kernel"], 1)}
    return {**params, "text": new_t}, cfg.with_vocab_size(new_size)


EXPORT_INFO = "elva_export.json"


def write_export_info(path: str, *, trained_by: str | None, embedding: str | None, stages: tuple[str, ...]) -> str:
    """Record next to an exported checkpoint which stage trained it last and with which embedding.

    ``python -m elva_jax.eval`` reads it when ``eval.mode`` is ``auto``: a checkpoint trained by the RL
    stage (``embedding`` "ret") is evaluated with summaries + [RET], as the paper does.
    """
    info = {"trained_by": trained_by, "embedding": embedding, "stages": list(stages)}
    out = os.path.join(path, EXPORT_INFO)
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return out


def read_export_info(path: str) -> dict | None:
    """The export record of a checkpoint directory (see :func:`write_export_info`), or None if absent.

    An unreadable record is a CheckpointError naming the file (never silently ignored).
    """
    p = os.path.join(str(path), EXPORT_INFO)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: unreadable export record ({e})") from None
    return info
