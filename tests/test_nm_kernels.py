"""CPU N:M kernels (AVX-512 2:4 "perm", "dp" and "dprows" kernels, generic numba kernel) vs the torch oracle."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsewise.nm import NMTensor
from sparsewise.nm.kernels import (available_kernels, avx2_available, avx512_available, nm24_supported, nm_matmul,
                                   perm_available, reference_matmul)

PROPS = settings(max_examples=30, deadline=None)
PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (3, 16)]
BATCHES = [0, 1, 2, 3, 7, 8, 9, 13, 17]
needs_perm = pytest.mark.skipif(not perm_available(), reason="the 2:4 permute kernel needs AVX-512F or AVX2 + FMA")
needs_dp = pytest.mark.skipif("dp" not in available_kernels(NMTensor.from_dense(torch.randn(1, 64, dtype=torch.bfloat16))),
                              reason="the 2:4 bf16 dot-product kernel needs AVX512_BF16")


@st.composite
def kernel_cases(draw, fast=None):
    """(n, m, batch, out_features, in_features, dtype, seed).

    fast=True: 2:4 with any K % 4 == 0 (whole 32/64-input blocks plus scalar tails, K < 32
    included); fast=False: the other patterns (generic kernel only)."""
    if fast is True:
        n, m = 2, 4
        k = 4 * draw(st.integers(1, 48))
    else:
        n, m = draw(st.sampled_from([p for p in PATTERNS if p != (2, 4)] if fast is False else PATTERNS))
        k = m * draw(st.integers(1, 160 // m))
    o = draw(st.sampled_from([1, 3, 5, 7, 11, 17, 39]))
    b = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, b, o, k, dtype, seed


def make(n, m, b, o, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, k, generator=gen).to(dtype)
    x = torch.randn(b, k, generator=gen)
    return x, NMTensor.from_dense(w, n, m)


def assert_matches_reference(y, x, nmt, kernel=None):
    # the "dp" kernel multiplies bf16 x (as dense bf16 layers do): compare on the rounded input
    used = kernel or available_kernels(nmt)[0]
    ref = reference_matmul(x.to(torch.bfloat16) if used in ("dp", "dprows") else x, nmt)
    assert y.dtype == torch.float32
    assert tuple(y.shape) == (x.shape[0], nmt.shape[0])
    k = nmt.shape[1]
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * math.sqrt(k))


@PROPS
@given(kernel_cases())
def test_generic_kernel_matches_reference(case):
    x, nmt = make(*case)
    assert_matches_reference(nm_matmul(x, nmt, kernel="generic"), x, nmt, "generic")


@PROPS
@given(kernel_cases())
def test_auto_dispatch_matches_reference(case):
    x, nmt = make(*case)
    assert_matches_reference(nm_matmul(x, nmt), x, nmt)


@PROPS
@given(kernel_cases(fast=False))
def test_non_fast_shapes_match_reference(case):
    n, m, b, o, k, dtype, seed = case
    assert not nm24_supported(n, m, k)
    x, nmt = make(*case)
    assert_matches_reference(nm_matmul(x, nmt), x, nmt)


@needs_perm
@PROPS
@given(kernel_cases(fast=True))
def test_fast_24_kernels_match_reference_and_generic(case):
    n, m, b, o, k, dtype, seed = case
    assert nm24_supported(n, m, k)
    x, nmt = make(*case)
    kernels = available_kernels(nmt)
    assert "perm" in kernels
    for kernel in kernels:
        y = nm_matmul(x, nmt, kernel=kernel)
        assert_matches_reference(y, x, nmt, kernel)
        xin = x.to(torch.bfloat16) if kernel in ("dp", "dprows") else x
        torch.testing.assert_close(y, nm_matmul(xin, nmt, kernel="generic"), rtol=1e-4, atol=1e-4 * math.sqrt(k))


def test_unusable_kernel_is_refused():
    nmt = NMTensor.from_dense(torch.randn(3, 36), 1, 4)  # not 2:4: only the generic kernel
    assert available_kernels(nmt) == ["generic"]
    with pytest.raises(ValueError, match="cannot run"):
        nm_matmul(torch.randn(2, 36), nmt, kernel="perm")
    with pytest.raises(ValueError, match="cannot run"):
        nm_matmul(torch.randn(2, 36), NMTensor.from_dense(torch.randn(3, 36), 2, 4), kernel="dp")  # fp32 values


@pytest.mark.parametrize("kernel", ["generic", pytest.param("perm", marks=needs_perm), pytest.param("dp", marks=needs_dp),
                                    pytest.param("dprows", marks=needs_dp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_inputs_pick_exact_columns(kernel, dtype):
    if kernel in ("dp", "dprows") and dtype != torch.bfloat16:
        pytest.skip("the dp kernel takes bf16 weights")
    # x = identity: row j of the output is column j of the pruned weight, exactly
    k, o = 64, 9
    w = torch.randn(o, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    nmt = NMTensor.from_dense(w, 2, 4)
    y = nm_matmul(torch.eye(k), nmt, kernel=kernel)
    assert torch.equal(y, nmt.to_dense().float().T)


@pytest.mark.parametrize("kernel", ["generic", pytest.param("perm", marks=needs_perm)])
def test_batch_zero_and_output_is_fresh(kernel):
    nmt = NMTensor.from_dense(torch.randn(5, 32), 2, 4)
    y = nm_matmul(torch.empty(0, 32), nmt, kernel=kernel)
    assert tuple(y.shape) == (0, 5) and y.dtype == torch.float32
    x = torch.randn(3, 32)
    y1 = nm_matmul(x, nmt, kernel=kernel)
    y2 = nm_matmul(x, nmt, kernel=kernel)
    assert torch.equal(y1, y2) and y1.data_ptr() != y2.data_ptr()  # deterministic, not aliased


def test_reference_is_dense_matmul():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 16, generator=gen)
    nmt = NMTensor.from_dense(w, 2, 4)
    x = torch.randn(3, 16, generator=gen)
    assert torch.equal(reference_matmul(x, nmt), x @ nmt.to_dense().T)
    xb = x.to(torch.bfloat16)
    assert reference_matmul(xb, nmt).dtype == torch.float32


def test_nm24_supported():
    assert nm24_supported(2, 4, 64) == perm_available()
    assert nm24_supported(2, 4, 32) == perm_available()
    assert nm24_supported(2, 4, 36) == perm_available()  # whole blocks + a scalar tail
    assert nm24_supported(2, 4, 4) == perm_available()  # tail only
    assert not nm24_supported(2, 4, 38)
    assert not nm24_supported(1, 4, 64)
    assert not nm24_supported(4, 8, 64)
    assert perm_available() == (avx512_available() or avx2_available())
    assert isinstance(avx512_available(), bool) and isinstance(avx2_available(), bool)


def test_avx2_x_group_order_serves_every_lane():
    # the AVX2 "perm" kernel picks lane d (kept value PERM_LANES[d], of group PERM_LANES[d] // 2)
    # from 128-bit lane L of 8-input x half h, h = 2 * (d // 8) + (d % 4 >= 2), L = (d % 8) // 4:
    # that 4-input slot must hold the lane's group, for every lane, and the slots are a
    # permutation of the block's 8 groups
    from sparsewise.nm.kernels import PERM_LANES, _avx2_groups, perm_x_groups

    groups = _avx2_groups()
    assert sorted(groups) == list(range(8)) and sorted(PERM_LANES) == list(range(16))
    for d, kept in enumerate(PERM_LANES):
        h, lane = 2 * (d // 8) + (d % 4 >= 2), (d % 8) // 4
        assert groups[2 * h + lane] == kept // 2, d
    assert perm_x_groups() == (None if avx512_available() or not avx2_available() else groups)


def test_kernel_rejects_unsupported_value_dtype():
    nmt = NMTensor.from_dense(torch.randn(3, 16, dtype=torch.float16), 2, 4)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        nm_matmul(torch.randn(2, 16), nmt)


@pytest.mark.parametrize("kernel", ["generic", pytest.param("perm", marks=needs_perm)])
def test_integer_valued_inputs_are_exact(kernel):
    # bf16 weights are widened exactly; small-integer products and sums are exact in fp32
    k, o = 32, 3
    w = torch.arange(o * k, dtype=torch.float32).reshape(o, k).remainder(7).sub(3).to(torch.bfloat16)
    nmt = NMTensor.from_dense(w, 2, 4)
    x = torch.arange(5 * k, dtype=torch.float32).reshape(5, k).remainder(5).sub(2)
    assert torch.equal(nm_matmul(x, nmt, kernel=kernel), reference_matmul(x, nmt))
    assert np.isfinite(nm_matmul(x, nmt, kernel=kernel).numpy()).all()


@pytest.mark.parametrize("kernel", ["generic", pytest.param("perm", marks=needs_perm), pytest.param("dp", marks=needs_dp),
                                    pytest.param("dprows", marks=needs_dp)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [96, 100])
def test_every_batch_tail_1_to_17(kernel, dtype, k):
    # the 2:4 kernels walk the batch in chunks of 4, 2, 1 and the rows in groups of 4 (7 rows: a
    # leftover group), and K=100 leaves a scalar tail after the last whole block ("dprows": batch
    # in passes of 8, 4, 2, 1; 7 rows of a 16-row panel; 24 / 25 groups, 8 / 9 after the last 16)
    if kernel in ("dp", "dprows") and dtype != torch.bfloat16:
        pytest.skip("the dp kernel takes bf16 weights")
    gen = torch.Generator().manual_seed(3)
    nmt = NMTensor.from_dense(torch.randn(7, k, generator=gen).to(dtype), 2, 4)
    x = torch.randn(17, k, generator=gen)
    for b in range(1, 18):
        assert_matches_reference(nm_matmul(x[:b].contiguous(), nmt, kernel=kernel), x[:b], nmt, kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_weight(dtype):
    # a weight of a few hundred KiB: big enough that the kernels may split rows across threads
    gen = torch.Generator().manual_seed(4)
    nmt = NMTensor.from_dense(torch.randn(256, 1024, generator=gen).to(dtype), 2, 4)
    assert nmt.nbytes > 256 << 10
    x = torch.randn(9, 1024, generator=gen)
    assert_matches_reference(nm_matmul(x, nmt), x, nmt)
    assert_matches_reference(nm_matmul(x, nmt, kernel="generic"), x, nmt, "generic")


@needs_dp
def test_dp_decode_without_vbmi(monkeypatch):
    # CPUs with AVX512_BF16 but no AVX512_VBMI (Cooper Lake) decode the 2-bit positions with a word
    # shuffle and shifts instead of vpmultishiftqb: build the kernels as they would, and compare
    from sparsewise.nm import kernels

    flags = kernels.cpu_flags() - {"avx512vbmi"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    _par, ser = kernels._compiled.__wrapped__()["dp"]
    gen = torch.Generator().manual_seed(5)
    nmt = NMTensor.from_dense(torch.randn(7, 136, generator=gen).to(torch.bfloat16), 2, 4)
    vals, idx = kernels._as_kernel_values(nmt.values), nmt.indices.numpy().reshape(-1)
    for b in (1, 3, 6):
        x = torch.randn(b, 136, generator=gen).to(torch.bfloat16)
        xm = kernels._block_major(x[:, :128], 64, False) if b > 1 else x[:, :128].contiguous()
        xt = x[:, 128:].float().contiguous().numpy().reshape(-1)
        y = torch.empty(b, 7)
        ser(vals, idx, xm.view(torch.int16).numpy().reshape(-1), xt, y.numpy().reshape(-1), 7, 136, b,
            np.zeros(0, np.float32))
        assert_matches_reference(y, x, nmt, "dp")


@pytest.fixture(scope="module")
def tiled_kernels():
    # large layers at batch >= 8 run in row tiles with K in chunks (accumulating into y): kernels
    # built with the size threshold at 0, 3-block chunks and 8 KB tiles, so a small layer takes
    # that path with several tiles per thread (each asking for the next)
    from sparsewise.nm import kernels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_TILE_MIN_BYTES", 0)
        mp.setattr(kernels, "_TILE_BLOCKS", 3)
        mp.setattr(kernels, "_TILE_KB", 8)
        built = kernels._compiled.__wrapped__()
        yield built


@pytest.mark.skipif(not avx512_available(), reason="the row tiles are built only on AVX-512 (kernels.make_driver)")
@pytest.mark.parametrize("kernel", ["dp", "perm"])
@pytest.mark.parametrize("b", [8, 9, 13, 24, 30])
def test_row_tiles_match_reference(tiled_kernels, kernel, b):
    # rows not a multiple of the tile or of its row step, K not a multiple of the chunk, a tail
    from sparsewise.nm import kernels

    if kernel == "dp" and not {"avx512bw", "avx512_bf16"} <= kernels.cpu_flags():
        pytest.skip("the dp kernel needs AVX512_BF16")
    par, _ser = tiled_kernels[kernel]
    gen = torch.Generator().manual_seed(b)
    o, k = 135, 7 * 64 + 12
    nmt = NMTensor.from_dense(torch.randn(o, k, generator=gen).to(torch.bfloat16), 2, 4)
    x = torch.randn(b, k, generator=gen)
    blk = 64 if kernel == "dp" else 32
    kmain = k // blk * blk
    xdtype = torch.bfloat16 if kernel == "dp" else torch.float32
    xm = kernels._block_major(x[:, :kmain].to(xdtype), blk, True)
    xv = xm.view(torch.int16).numpy().reshape(-1) if kernel == "dp" else xm.numpy().reshape(-1)
    xt = x[:, kmain:].to(xdtype).float().contiguous().numpy().reshape(-1)
    bias = torch.randn(o, generator=gen)
    y = torch.full((b, o), float("nan"))  # every element must be written
    par(kernels._as_kernel_values(nmt.values), nmt.indices.numpy().reshape(-1), xv, xt, y.numpy().reshape(-1),
        o, k, b, bias.numpy())
    assert_matches_reference(y - bias, x, nmt, kernel)


@needs_dp
@pytest.mark.parametrize("b", [1, 12, 13, 31])
def test_dprows_panels_chunks_and_tails(b):
    # "dprows" built with 32-group K chunks run in 16-group slices: 3 panels of 16 rows (the last
    # one with 5), K chunks of 32 + 32 + 7 groups (each chunk's 16-group blocks, then scalar
    # groups), slices of 16 + 16 and 7, the next chunk asked for across panels; bias added once;
    # every output written
    from sparsewise.nm import dprows, kernels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dprows, "CHUNK", 32)
        mp.setattr(dprows, "SUB", 16)
        par, ser = dprows.compiled.__wrapped__()
    gen = torch.Generator().manual_seed(b)
    o, k = 37, 4 * 71
    nmt = NMTensor.from_dense(torch.randn(o, k, generator=gen).to(torch.bfloat16), 2, 4)
    x = torch.randn(b, k, generator=gen)
    bias = torch.randn(o, generator=gen)
    xv = x.to(torch.bfloat16).view(torch.int16).numpy().reshape(-1)
    for kern in (par, ser):
        y = torch.full((b, o), float("nan"))
        kern(kernels._as_kernel_values(nmt.values), nmt.indices.numpy().reshape(-1), xv, y.numpy().reshape(-1),
             o, k, b, bias.numpy())
        assert_matches_reference(y - bias, x, nmt, "dprows")


@needs_dp
def test_default_kernel_follows_batch_and_shape(monkeypatch):
    # bf16 2:4: "dp" below rows_min_batch, "dprows" from it (ROWS_MIN_BATCH for small or tall
    # weights, ROWS_MIN_BATCH_WIDE for large ones with in >= out); each default gives what the
    # forced kernel gives
    from sparsewise.nm import kernels

    gen = torch.Generator().manual_seed(9)
    tall = NMTensor.from_dense(torch.randn(136, 64, generator=gen).to(torch.bfloat16), 2, 4)
    wide = NMTensor.from_dense(torch.randn(20, 256, generator=gen).to(torch.bfloat16), 2, 4)
    # the size threshold shrunk so that a test-sized weight counts as large
    monkeypatch.setattr(kernels, "_ROWS_WIDE_MIN_BYTES", min(tall.nbytes, wide.nbytes))
    assert kernels.rows_min_batch(tall) == kernels.ROWS_MIN_BATCH
    assert kernels.rows_min_batch(wide) == kernels.ROWS_MIN_BATCH_WIDE
    monkeypatch.setattr(kernels, "_ROWS_WIDE_MIN_BYTES", max(tall.nbytes, wide.nbytes) + 1)
    assert kernels.rows_min_batch(wide) == kernels.ROWS_MIN_BATCH
    monkeypatch.setattr(kernels, "_ROWS_WIDE_MIN_BYTES", min(tall.nbytes, wide.nbytes))
    for nmt in (tall, wide):
        first = kernels.rows_min_batch(nmt)
        for b in (1, first - 1, first, 40):
            x = torch.randn(b, nmt.shape[1], generator=gen)
            want = "dprows" if b >= first else "dp"
            assert kernels._kernel_args(nmt, b) is nmt._kernel_args[2][want]
            assert torch.equal(nm_matmul(x, nmt), nm_matmul(x, nmt, kernel=want))
