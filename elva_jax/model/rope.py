"""Rotary position embeddings: M-RoPE for the LLM and 2-D axial RoPE for the vision tower.

Host side (numpy, shape-dependent): position ids, computed like transformers' `get_rope_index`.
Device side (jnp, jittable): cos/sin tables and the non-interleaved "rotate_half" rotation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """[B, L] int32: 0 text, 1 `<|image_pad|>`, 2 `<|video_pad|>` (transformers' `mm_token_type_ids`)."""
    t = np.zeros(input_ids.shape, np.int32)
    t[input_ids == image_token_id] = IMAGE
    t[input_ids == video_token_id] = VIDEO
    return t


def mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_types: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
    video_grid_thw: np.ndarray | None = None,
    video_time_interval: np.ndarray | None = None,
) -> np.ndarray:
    """3-D (t, h, w) positions [3, B, L] int32 as in transformers' `get_rope_index`.

    Only non-padding tokens are numbered (padding keeps 0). Text tokens count up with t = h = w;
    a visual grid with LLM grid (t, h/m, w/m) starting at `start` gets
    t = start + floor(t_index * interval), h = start + row, w = start + col, and the text after it
    resumes at start + max(h, w) / m. Images (interval 1) are consumed from `image_grid_thw` by the
    `<|image_pad|>` runs, videos from `video_grid_thw` by the `<|video_pad|>` runs, each in row-major
    batch order; `video_time_interval` [n_videos] float32 is each video's interval (default 1; the
    product t_index * interval is taken in float32 and truncated, as transformers does).
    """
    B, L = input_ids.shape
    pos = np.zeros((3, B, L), np.int32)
    grids = {
        IMAGE: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3).tolist()),
        VIDEO: iter([] if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3).tolist()),
    }
    n_vid = 0 if video_grid_thw is None else len(np.asarray(video_grid_thw).reshape(-1, 3))
    if video_time_interval is None:
        video_time_interval = np.ones(n_vid, np.float32)
    intervals = iter(np.asarray(video_time_interval, np.float32).reshape(-1).tolist())
    names = {IMAGE: ("<|image_pad|>", "image_grid_thw"), VIDEO: ("<|video_pad|>", "video_grid_thw")}
    for b in range(B):
        keep = np.asarray(attention_mask[b]).astype(bool)
        types = token_types[b][keep]
        out = np.zeros((3, len(types)), np.int64)
        i, cur = 0, 0
        while i < len(types):
            j = i
            while j < len(types) and types[j] == types[i]:
                j += 1
            kind = int(types[i])
            if kind == TEXT:
                out[:, i:j] = cur + np.arange(j - i)
                cur += j - i
            else:
                # consecutive pad runs may hold several grids back to back
                tok, key = names[kind]
                k = i
                while k < j:
                    try:
                        gt, gh, gw = next(grids[kind])
                    except StopIteration:
                        raise ValueError(f"row {b}: more {tok} runs than {key} rows") from None
                    step = np.float32(next(intervals)) if kind == VIDEO else np.float32(1)
                    h, w = gh // spatial_merge_size, gw // spatial_merge_size
                    n = gt * h * w
                    if k + n > j:
                        raise ValueError(
                            f"row {b}: grid {(gt, gh, gw)} needs {n} {tok} tokens, only {j - k} remain in the run"
                        )
                    t_ids = (np.arange(gt, dtype=np.float32) * step).astype(np.int64)
                    tt, hh, ww = np.meshgrid(t_ids, np.arange(h), np.arange(w), indexing="ij")
                    out[0, k : k + n] = cur + tt.reshape(-1)
                    out[1, k : k + n] = cur + hh.reshape(-1)
                    out[2, k : k + n] = cur + ww.reshape(-1)
                    cur += max(h, w)
                    k += n
            i = j
        pos[:, b, keep] = out
    for kind, it in grids.items():
        leftover = list(it)
        if leftover:
            tok, key = names[kind]
            raise ValueError(f"{len(leftover)} {key} rows have no {tok} tokens")
    return pos


def linear_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions [3, B, L]: 0.. over each row's non-padding tokens, images included (LamRA mode).

    Equals 0..L-1 for unpadded or right-padded rows (what LamRA's reference ran with).
    """
    m = np.asarray(attention_mask).astype(np.int64)
    p = np.maximum(np.cumsum(m, axis=1) - 1, 0) * m
    return np.broadcast_to(p[None].astype(np.int32), (3,) + m.shape).copy()


def vision_position_ids(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(row, col) of every patch [N, 2] in the processor's merge-window order (each m x m window contiguous)."""
    out = []
    m = spatial_merge_size
    for t, h, w in np.asarray(image_grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh = hh.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    if not out:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(out).astype(np.int32)


def mrope_positions_for(
    input_ids,
    attention_mask,
    image_grid_thw,
    cfg,
    mode: str,
    video_grid_thw=None,
    second_per_grid_ts=None,
) -> np.ndarray:
    """[3, B, L] int32 position ids of a batch: Qwen2-VL's `get_rope_index` rule ("mrope": a video's
    temporal index counts 0, 1, ... per temporal patch; `second_per_grid_ts` is ignored) or LamRA's
    running 1-D positions ("1d"). cfg: a `ModelConfig` (image/video token ids, merge size)."""
    return mrope_positions_scaled(input_ids, attention_mask, image_grid_thw, cfg, mode, video_grid_thw, None)


def mrope_positions_scaled(
    input_ids, attention_mask, image_grid_thw, cfg, mode: str, video_grid_thw=None, video_time_interval=None
) -> np.ndarray:
    """`mrope_positions_for` with an explicit float32 time interval per video (see `mrope_position_ids`)."""
    if mode == "1d":
        return linear_position_ids(attention_mask)
    types = mm_token_types(np.asarray(input_ids), cfg.image_token_id, cfg.video_token_id)
    return mrope_position_ids(
        np.asarray(input_ids),
        np.asarray(attention_mask),
        types,
        image_grid_thw,
        cfg.vision.spatial_merge_size,
        video_grid_thw,
        video_time_interval,
    )


# ---------------------------------------------------------------- device side


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def mrope_axis_of(head_dim: int, section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """[head_dim/2] int: the position axis (0 t, 1 h, 2 w) each rotary frequency reads.

    Blocked (Qwen2-VL): the first section[0] frequencies use t, the next section[1] h, then w.
    Interleaved (Qwen3-VL's `apply_interleaved_mrope`): frequency j uses h when j % 3 == 1 and
    j < 3 * section[1], w when j % 3 == 2 and j < 3 * section[2], t otherwise.
    """
    if not interleaved:
        return np.concatenate([np.full(s, i % 3) for i, s in enumerate(section)])
    j = np.arange(head_dim // 2)
    axis = np.zeros(head_dim // 2, np.int64)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


def mrope_cos_sin(
    positions: jnp.ndarray, head_dim: int, theta: float, section: tuple[int, ...], interleaved: bool = False
):
    """cos, sin [B, L, head_dim] fp32 from positions [3, B, L].

    inv_freq_j = theta^(-2j/head_dim), j < head_dim/2; frequency j takes its position from axis
    a(j) in (t, h, w) by `section` (e.g. [16, 24, 24]), blocked or interleaved (`mrope_axis_of`);
    the half is then repeated (rotate_half layout).
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    axis_of = mrope_axis_of(head_dim, section, interleaved)
    # positions of the axis each frequency uses: [B, L, head_dim/2]
    p = jnp.moveaxis(positions.astype(jnp.float32), 0, -1)[..., axis_of]
    freqs = p * jnp.asarray(inv, jnp.float32)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def vision_cos_sin(pos_hw: jnp.ndarray, head_dim: int, theta: float):
    """cos, sin [..., head_dim] fp32 from patch (row, col) [..., 2].

    inv_freq over head_dim/2 dims (head_dim/4 frequencies): angles = [row*f, col*f] repeated twice.
    """
    spatial = head_dim // 2
    inv = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    p = pos_hw.astype(jnp.float32)
    f = jnp.concatenate([p[..., 0:1] * inv, p[..., 1:2] * inv], axis=-1)
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f), jnp.sin(f)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [..., heads, head_dim] rotated by cos/sin [..., head_dim] (broadcast over heads)."""
    c, s = cos[..., None, :], sin[..., None, :]
    return x * c.astype(x.dtype) + rotate_half(x) * s.astype(x.dtype)
