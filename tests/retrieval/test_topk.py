"""streaming_topk == full stable argsort, including ties, padding, sharding and memmapped input.

Integer-valued data keeps every dot product exact, so scores are bit-identical to numpy's and the
(score desc, index asc) order is fully determined despite heavy ties.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.device_check import without_device_count

from elva_jax.retrieval import recall_at_k, recall_from_topk, streaming_topk


def _int_data(seed, n_q, n_c, dim=6):
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (n_q, dim)).astype(np.float32)
    c = rng.integers(-2, 3, (n_c, dim)).astype(np.float32)
    return q, c


def _reference(q, c, k):
    s = q @ c.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def _check(q, c, k, **kw):
    v, i = streaming_topk(q, c, k, **kw)
    rv, ri = _reference(q, c, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)
    assert v.dtype == np.float32 and v.shape == i.shape == (q.shape[0], k)


def test_lax_top_k_is_stable_on_this_backend():
    """The merge relies on lax.top_k putting the lower position first among equal values."""
    rng = np.random.default_rng(0)
    s = np.round(rng.standard_normal((64, 3000)), 1).astype(np.float32)
    _, i = jax.lax.top_k(jnp.asarray(s), 40)
    np.testing.assert_array_equal(np.asarray(i), np.argsort(-s, axis=1, kind="stable")[:, :40])


@pytest.mark.parametrize(
    "n_c,chunk,k,block,qblock",
    [
        (1000, 250, 5, None, None),  # chunk divides C
        (1000, 300, 5, None, 16),  # last chunk padded, query blocks with padding
        (1000, 333, 7, 0, None),  # plain lax.top_k per chunk
        (3000, 1024, 3, None, None),  # two-stage (auto b=16), padded last chunk
        (3000, 1024, 4, 8, 10),  # two-stage with small blocks, many ties across blocks
        (500, 16, 40, None, None),  # k > chunk size
        (37, 4096, 37, None, None),  # chunk > C, k == C
    ],
)
def test_matches_stable_argsort(n_c, chunk, k, block, qblock):
    q, c = _int_data(n_c, 23, n_c)
    _check(q, c, k, chunk_size=chunk, block_size=block, query_block_size=qblock)


def test_best_candidate_in_padded_tail():
    # The last row (copied into the padding) is every query's unique best: padding must not leak.
    q, c = _int_data(1, 17, 2500)
    q = np.abs(q) + 1
    c[-1] = 10.0
    c[-3] = 10.0  # a tie with a lower index -> ranks first
    _check(q, c, 6, chunk_size=1024)
    v, i = streaming_topk(q, c, 6, chunk_size=1024)
    assert (i[:, 0] == 2497).all() and (i[:, 1] == 2499).all() and (i < 2500).all()


@pytest.mark.parametrize("block", [None, 8])
def test_boundary_ties_across_blocks_with_different_maxima(block):
    # Few 3s, some 2s: the top-10 boundary falls among tied 2s spread over blocks whose maxima are
    # 2 or 3, so gathered blocks must be laid out in index order (not block-maximum order).
    rng = np.random.default_rng(6)
    vals = rng.choice(4, size=(3000, 2), p=[0.6, 0.386, 0.012, 0.002]).astype(np.float32)
    q = np.array([[1, 0], [0, 1], [1, 1], [2, 1]], np.float32)
    _check(q, vals, 10, chunk_size=2048, block_size=block)
    # Hand-made: block 0 = [2, 0, ...], block 1 = [3, 2, 0, ...] -> top-2 is (8, 0), not (8, 9).
    c = np.zeros((64, 1), np.float32)
    c[0], c[8], c[9] = 2, 3, 2
    _check(np.ones((1, 1), np.float32), c, 2, chunk_size=64, block_size=8)


def test_partial_block_maximum_is_exact():
    # Last chunk: blocks 0 and 1 hold the two best rows, block 2 is partial with poor rows. Were the
    # padding scored above them (e.g. zero rows -> 0), block 2 would displace block 1.
    q = np.ones((3, 4), np.float32)
    c = np.full((1024 + 40, 4), -25.0, np.float32)
    c[1024 + 3] = c[1024 + 17] = -0.25
    for cands in (c, jnp.asarray(c)):
        _check(q, cands, 2, chunk_size=1024, block_size=16)
    # Best row last: its copies fill the padded blocks, whose maxima must not displace blocks 0, 1.
    c[-1] = 1.0
    for cands in (c, jnp.asarray(c)):
        _check(q, cands, 3, chunk_size=1024, block_size=16)


def test_jax_memmap_and_fp16_inputs(tmp_path):
    q, c = _int_data(2, 11, 2048)
    path = tmp_path / "cands.npy"
    np.save(path, c)
    mm = np.load(path, mmap_mode="r")  # .npy data is 64-byte aligned -> zero-copy chunks
    for cands in (mm, jnp.asarray(c), c.astype(np.float16)):
        _check(q, cands, 5, chunk_size=512)
    _check(jnp.asarray(q), c[:2000], 5, chunk_size=512)  # jax queries, padded last chunk


def test_random_float_data_agrees_up_to_rounding():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((30, 64), dtype=np.float32)
    c = rng.standard_normal((5000, 64), dtype=np.float32)
    v, i = streaming_topk(q, c, 10, chunk_size=2048)
    s = q.astype(np.float64) @ c.T.astype(np.float64)
    ref = np.sort(s, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(v, ref, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(s, i, axis=1), ref, atol=1e-4)


def test_errors():
    q, c = _int_data(4, 3, 8)
    with pytest.raises(ValueError, match="exceeds the number of candidates"):
        streaming_topk(q, c, 9)
    with pytest.raises(ValueError, match="k must be"):
        streaming_topk(q, c, 0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        streaming_topk(q, c[:, :4], 2)


def test_recall_from_streaming_topk_equals_recall_at_k():
    q, c = _int_data(5, 50, 1500)
    s = q @ c.T
    rng = np.random.default_rng(5)
    relevant = rng.random(s.shape) < 0.01
    relevant[np.arange(50), rng.integers(0, 1500, 50)] = True
    _, idx = streaming_topk(q, c, 10, chunk_size=512)
    for k in (1, 5, 10):
        assert recall_from_topk(idx, relevant, k) == recall_at_k(s, relevant, k)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh
    from elva_jax.retrieval import streaming_topk
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, (19, 6)).astype(np.float32)
    c = rng.integers(-2, 3, (20003, 6)).astype(np.float32)
    s = q @ c.T
    ref = np.argsort(-s, axis=1, kind="stable")
    devs = np.array(jax.devices())
    meshes = [Mesh(devs, ("x",)), Mesh(devs.reshape(2, 4), ("a", "b"))]
    cases = [(8192, 5, None), (1003, 7, None), (20, 30, None), (6000, 4, 0)]
    for mesh in meshes:
        for chunk, k, block in cases:
            v, i = streaming_topk(q, c, k, chunk_size=chunk, mesh=mesh, block_size=block)
            v0, i0 = streaming_topk(q, c, k, chunk_size=chunk, block_size=block)
            assert (i == i0).all() and (v == v0).all(), (mesh, chunk, k)
            assert (i == ref[:, :k]).all(), (mesh, chunk, k)
    print("SHARDED_OK")
    """
)


def test_sharded_equals_unsharded_on_8_fake_devices():
    flags = without_device_count(os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8".strip(), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_OK" in out.stdout
