"""Exact streaming inner-product top-k over large candidate pools (JAX).

For queries q [Q, D] and candidates c [C, D] (numpy, ``np.memmap``/``np.load(mmap_mode="r")`` or
jax), returns the k best candidates per query under s[q, c] = <q, c> (fp32), ordered by
(score descending, candidate index ascending): the same as ``np.argsort(-s, kind="stable")[:, :k]``.

Candidates are streamed in chunks of W rows (the last one padded to W with copies of its last row
and the padded columns masked to -inf, so every chunk has one shape and one compile). Per chunk, one
jitted step computes the fp32 matmul and an exact two-stage top-k, then merges it into the running
[Q, k] state:

1. block maxima: view the chunk scores [Q, W] as [Q, W/b, b] and take m = max over b;
2. keep the k blocks with the largest m (ties to the lower block), re-sorted by block index;
3. top-k over the gathered k*b scores -> chunk top-k; merge with the running top-k via a sort on
   (-score, index).

Step 2 is exact: every element of the (stable) top-k lies in a block whose maximum ranks among the
top k blocks (k blocks ahead of it would each hold an element ranked ahead of it). This replaces a
[Q, W] top-k by a [Q, W] max-reduction plus two tiny top-ks, leaving the cost at the matmul.

Ties: ``jax.lax.top_k`` on CPU is stable (lower position first; tested in tests/eval/test_topk.py),
and every top-k input here is laid out in candidate-index order. Signed zeros are canonicalised so
+0.0 and -0.0 tie as in numpy. NaN scores are unsupported.

With a ``jax.sharding.Mesh``, each chunk's rows are split over all mesh devices (``shard_map``):
each device computes its local top-k, the [Q, n_dev * k] candidates are all-gathered and merged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elva_jax.retrieval.ties import FAISS_MAX_K, TIE_ORDERS, faiss_flat_order

__all__ = ["streaming_topk"]

_SENTINEL = np.iinfo(np.int32).max  # index of "no candidate yet"; loses every tie


def _pick_block(local_width: int, k: int) -> int:
    """Block size b for the two-stage top-k over a [Q, L] slab, or 0 for a direct lax.top_k.

    b is the largest power of two <= min(256, sqrt(L / k)) dividing L; it keeps both W/b block
    maxima and k*b gathered scores small. Needs b >= 8 and L / b >= 2k to be worth it.
    """
    b = 1 << max(0, int(math.isqrt(max(1, local_width // k))).bit_length() - 1)
    b = min(b, 256)
    while b > 1 and local_width % b:
        b //= 2
    if b < 8 or local_width // b < 2 * k:
        return 0
    return b


def _canon(x: jax.Array) -> jax.Array:
    """Map -0.0 to +0.0 so both compare equal in top_k (which orders -0.0 below +0.0)."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def _local_topk(s: jax.Array, kc: int, b: int, col0, n_valid) -> tuple[jax.Array, jax.Array]:
    """Exact stable top-kc of s [Q, L] over columns col0 + j < n_valid -> (values, local cols) [Q, kc].

    Two-stage (b > 0): the [Q, L] scores are only read by one max-reduction and one gather (no
    elementwise pass, so the reduction reads the matmul output directly). Padded columns must hold
    copies of the last valid candidate: then the one partial block's maximum is still exact, fully
    padded blocks are masked on the [Q, L/b] maxima and padded columns on the [Q, kc*b] gather.
    """
    n_q, width = s.shape
    if not b:
        col = col0 + jnp.arange(width, dtype=jnp.int32)
        return jax.lax.top_k(jnp.where(col < n_valid, _canon(s), -jnp.inf), kc)
    s3 = s.reshape(n_q, width // b, b)
    blk_col = col0 + b * jnp.arange(width // b, dtype=jnp.int32)
    m = jnp.where(blk_col < n_valid, _canon(s3.max(axis=2)), -jnp.inf)
    _, blk = jax.lax.top_k(m, kc)  # [Q, kc] best blocks, ties -> lower block
    blk = jnp.sort(blk, axis=1)  # index order, so positions below follow candidate order
    g = jnp.take_along_axis(s3, blk[:, :, None], axis=1)  # [Q, kc, b]
    g_col = col0 + blk[:, :, None] * b + jnp.arange(b, dtype=jnp.int32)
    g = jnp.where(g_col < n_valid, _canon(g), -jnp.inf).reshape(n_q, kc * b)
    v, j = jax.lax.top_k(g, kc)
    return v, jnp.take_along_axis(blk, j // b, axis=1) * b + j % b


def _merge(rv, ri, v, i, k: int):
    """Top-k of the union of two (score, index) lists, ordered by (score desc, index asc)."""
    neg, idx = jax.lax.sort((-jnp.concatenate([rv, v], 1), jnp.concatenate([ri, i], 1)), dimension=1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


def _chunk_candidates(q, c, n_valid, col0, kc: int, b: int):
    """Scores of q [Q, D] vs c [L, D] in fp32; local top-kc over valid columns -> (values, chunk cols)."""
    s = jnp.dot(q, c.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    v, j = _local_topk(s, kc, b, col0, n_valid)
    return v, j + col0


@functools.lru_cache(maxsize=64)
def _make_step(k: int, kc: int, b: int, mesh: Mesh | None):
    """Jitted step(rv, ri, q, chunk, offset, n_valid) -> new running (values [Q,k], indices [Q,k])."""
    if mesh is None:

        def step(rv, ri, q, c, offset, n_valid):
            v, j = _chunk_candidates(q, c, n_valid, jnp.int32(0), kc, b)
            return _merge(rv, ri, v, j + offset, k)

        return jax.jit(step)

    axes = tuple(mesh.axis_names)

    def local(rv, ri, q, c, offset, n_valid):
        col0 = (jax.lax.axis_index(axes) * c.shape[0]).astype(jnp.int32)
        v, j = _chunk_candidates(q, c, n_valid, col0, kc, b)
        # Device-major gather: [Q, n_dev * kc]; _merge's (score, index) sort makes order irrelevant.
        v = jax.lax.all_gather(v, axes, axis=1, tiled=True)
        j = jax.lax.all_gather(j, axes, axis=1, tiled=True)
        return _merge(rv, ri, v, j + offset, k)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(axes, None), P(), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(sharded)


def _aligned_empty(shape: tuple[int, int]) -> np.ndarray:
    """Uninitialised fp32 array whose data is 64-byte aligned (so CPU device_put can alias it)."""
    raw = np.empty(shape[0] * shape[1] * 4 + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + shape[0] * shape[1] * 4].view(np.float32).reshape(shape)


class _ChunkLoader:
    """Rows [start, start + n) of candidates as a device array [W, D], padded with the last valid row.

    Host chunks that are fp32, C-contiguous, 64-byte aligned and full (e.g. a memory-mapped .npy)
    go to the device without a copy; others are copied into one of two reused aligned staging
    buffers (no page faults per chunk). Double buffering is safe because the caller waits for the
    step using chunk t before loading chunk t + 2.
    """

    def __init__(self, candidates, width: int, sharding):
        self.candidates, self.width, self.sharding = candidates, width, sharding
        self.stages: list[np.ndarray] = []
        self.turn = 0

    def __call__(self, start: int, n: int):
        cands, width = self.candidates, self.width
        if isinstance(cands, jax.Array):
            c = cands[start : start + n]
            if n < width:  # pad with copies of the last valid row (see _local_topk)
                c = jnp.concatenate([c, jnp.broadcast_to(c[-1:], (width - n, c.shape[1]))])
            return c if self.sharding is None else jax.device_put(c, self.sharding)
        block = cands[start : start + n]
        if (
            n == width
            and isinstance(block, np.ndarray)
            and block.dtype == np.float32
            and block.flags.c_contiguous
            and block.ctypes.data % 64 == 0
        ):
            return jax.device_put(block, self.sharding)
        if len(self.stages) < 2:
            self.stages.append(_aligned_empty((width, cands.shape[1])))
        stage = self.stages[self.turn % len(self.stages)]
        self.turn += 1
        stage[:n] = block  # casts to fp32
        stage[n:] = stage[n - 1]  # copies of the last valid row (see _local_topk)
        return jax.device_put(stage, self.sharding, may_alias=True)


def streaming_topk(
    queries,
    candidates,
    k: int,
    *,
    chunk_size: int = 65536,
    query_block_size: int | None = 4096,
    mesh: Mesh | None = None,
    block_size: int | None = None,
    tie_order: str = "index",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over all candidates, streaming over candidates.

    Args:
      queries: [Q, D] float (numpy or jax).
      candidates: [C, D] float (numpy, memory-mapped .npy, or jax); read chunk by chunk.
      k: results per query, 1 <= k <= C.
      chunk_size: candidate rows per step W (rounded up to a multiple of the device count).
        Peak memory ~ query_block * W * 4 bytes of scores + 2 chunks of W * D.
      query_block_size: queries per step (last block zero-padded); None = all at once.
      mesh: optional Mesh; each chunk's rows are sharded over all of its devices.
      block_size: override the two-stage block size b (0 = plain lax.top_k per chunk).
      tie_order: "index" (lower candidate index first among equal scores) or "faiss": which tied
        candidates faiss's CPU ``IndexFlatIP`` keeps and in what order (UniIR's numbers;
        :mod:`elva_jax.retrieval.ties`, k <= 99). It widens the stable top-k until every tie at the
        k-th place is in it (one more pass over the pool per doubling), then applies faiss's rule.

    Returns:
      (scores [Q, k] float32, indices [Q, k] int64) numpy arrays, ordered by (score desc, index asc):
      indices == np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :k] for exactly computed scores.
      With tie_order="faiss": faiss's kept candidates, ordered by (score desc, index desc).
    """
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")
    if tie_order == "faiss":
        n_c = int(candidates.shape[0])
        if isinstance(k, int | np.integer) and not 1 <= k <= FAISS_MAX_K:
            raise ValueError(f"tie_order='faiss' models faiss's heap search, k <= {FAISS_MAX_K}; got k={k}")
        kw = dict(chunk_size=chunk_size, query_block_size=query_block_size, mesh=mesh, block_size=block_size)
        wide = min(n_c, 2 * k + 16)
        while True:
            v, i = streaming_topk(queries, candidates, wide, **kw)
            if wide == n_c or not len(v) or np.all(v[:, wide - 1] < v[:, k - 1]):
                return faiss_flat_order(v, i, k)
            wide = min(n_c, 2 * wide)
    q_np = queries if isinstance(queries, jax.Array) else np.asarray(queries)
    if q_np.ndim != 2 or len(candidates.shape) != 2:
        raise ValueError(f"queries {q_np.shape} and candidates {candidates.shape} must be [Q, D] and [C, D]")
    n_q, dim = q_np.shape
    n_c = int(candidates.shape[0])
    if candidates.shape[1] != dim:
        raise ValueError(f"dimension mismatch: queries D={dim}, candidates D={candidates.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n_c:
        raise ValueError(f"k={k} exceeds the number of candidates C={n_c}")
    if n_c >= _SENTINEL:
        raise ValueError(f"C={n_c} does not fit int32 candidate indices")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n_q == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)

    n_dev = 1 if mesh is None else mesh.devices.size
    width = -(-min(chunk_size, n_c) // n_dev) * n_dev  # W: chunk rows (padded), divisible by n_dev
    local_w = width // n_dev
    kc = min(k, local_w)
    b = _pick_block(local_w, kc) if block_size is None else int(block_size)
    if b and (local_w % b or local_w // b < kc):
        raise ValueError(f"block_size={b} must divide the per-device chunk {local_w} into >= {kc} blocks")
    step = _make_step(int(k), kc, b, mesh)
    c_sharding = None if mesh is None else NamedSharding(mesh, P(tuple(mesh.axis_names), None))
    r_sharding = None if mesh is None else NamedSharding(mesh, P())

    qb = n_q if query_block_size is None else max(1, min(int(query_block_size), n_q))
    n_blocks = -(-n_q // qb)
    q32 = jnp.asarray(q_np, dtype=jnp.float32) if isinstance(q_np, jax.Array) else q_np.astype(np.float32)
    q_blocks, states = [], []
    for i in range(n_blocks):
        blk = q32[i * qb : (i + 1) * qb]
        if blk.shape[0] < qb:  # pad so every step has one shape
            blk = jnp.pad(jnp.asarray(blk), ((0, qb - blk.shape[0]), (0, 0)))
        q_blocks.append(jax.device_put(blk, r_sharding))
        rv = jnp.full((qb, k), -jnp.inf, jnp.float32)
        ri = jnp.full((qb, k), _SENTINEL, jnp.int32)
        states.append((jax.device_put(rv, r_sharding), jax.device_put(ri, r_sharding)))

    starts = list(range(0, n_c, width))
    load = _ChunkLoader(candidates, width, c_sharding)
    chunk = load(0, min(width, n_c))
    for t, start in enumerate(starts):
        n_valid = np.int32(min(width, n_c - start))
        offset = np.int32(start)
        # Async dispatch: the device works on this chunk while the host loads the next one.
        new_states = [step(rv, ri, qblk, chunk, offset, n_valid) for (rv, ri), qblk in zip(states, q_blocks)]
        if t + 1 < len(starts):
            nxt = starts[t + 1]
            chunk = load(nxt, min(width, n_c - nxt))
        jax.block_until_ready(new_states)  # back-pressure: at most two chunks alive
        states = new_states

    scores = np.concatenate([np.asarray(v) for v, _ in states])[:n_q]
    indices = np.concatenate([np.asarray(i) for _, i in states])[:n_q].astype(np.int64)
    return scores, indices
