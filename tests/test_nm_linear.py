"""nm_linear (forward, autograd, NaN/Inf, input checks), SparseLinear, crossover_batch, sparsify_."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsewise.bench
import sparsewise.nm.functional as nm_functional
import sparsewise.nm.linear as nm_linear_mod
from sparsewise.nm import (NMConfig, NMTensor, SparseLinear, SparsifyReport, is_nm, nm_linear, nm_mask,
                           sparsify_)
from sparsewise.nm.linear import _PROBE_BATCHES
from sparsewise.nm.linear import crossover_batch as real_crossover_batch
from sparsewise.nm.linear import kernel_batches as real_kernel_batches

NEVER = 1 << 30


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch):
    # SparseLinear measures where its kernel wins on the first no-grad call; tests must not time
    # anything (another process may be benchmarking), so by default the kernel always wins.
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", lambda w, refresh=False: _PROBE_BATCHES)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def packed(o, k, n=2, m=4, dtype=torch.float32, seed=0):
    w = torch.randn(o, k, generator=gen(seed)).to(dtype)
    nmt = NMTensor.from_dense(w, n, m)
    return nmt, nmt.to_dense()


def close(a, b, dtype, k):
    if dtype == torch.bfloat16:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * math.sqrt(k))


# ------------------------------------------------------------------ nm_linear forward

X_SHAPES = {
    "1d": lambda k, g: torch.randn(k, generator=g),
    "2d": lambda k, g: torch.randn(5, k, generator=g),
    "3d": lambda k, g: torch.randn(2, 3, k, generator=g),
    "transposed": lambda k, g: torch.randn(k, 5, generator=g).T,
    "3d-noncontig": lambda k, g: torch.randn(2, k, 3, generator=g).transpose(1, 2),
    "strided": lambda k, g: torch.randn(4, 2 * k, generator=g)[:, ::2],
    "batch0": lambda k, g: torch.randn(0, k, generator=g),
    "3d-batch0": lambda k, g: torch.randn(2, 0, k, generator=g),
}
LAYERS = [(2, 4, 64, 7), (2, 4, 36, 5), (2, 4, 4, 1), (1, 4, 4, 3), (3, 8, 24, 1), (4, 8, 40, 9), (3, 16, 48, 2)]


@pytest.mark.parametrize("shape", list(X_SHAPES))
@pytest.mark.parametrize("n,m,k,o", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_f_linear(shape, n, m, k, o, dtype, with_bias):
    g = gen(k * 7 + o)
    nmt, w = packed(o, k, n, m, dtype, seed=o)
    x = X_SHAPES[shape](k, g).to(dtype)
    b = torch.randn(o, generator=g).to(dtype) if with_bias else None
    y = nm_linear(x, nmt, b)
    assert y.dtype == dtype and tuple(y.shape) == (*x.shape[:-1], o)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    close(y, ref, dtype, k)
    if dtype == torch.float32:
        close(y, F.linear(x, w, b), dtype, k)
    # the pure-torch backend agrees too
    close(nm_linear(x, nmt, b, backend="reference"), ref, dtype, k)


def test_forward_fp16_uses_the_reference_path():
    nmt, w = packed(6, 32, dtype=torch.float16)
    x = torch.randn(3, 32, generator=gen(1)).half()
    y = nm_linear(x, nmt)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def test_values_argument_replaces_weight_values():
    nmt, w = packed(5, 32)
    x = torch.randn(4, 32, generator=gen(2))
    y = nm_linear(x, nmt, values=nmt.values * 2)
    close(y, F.linear(x, 2 * w), torch.float32, 32)
    with pytest.raises(ValueError, match="values must be"):
        nm_linear(x, nmt, values=nmt.values[:, :-1])
    with pytest.raises(ValueError, match="values must be"):
        nm_linear(x, nmt, values=nmt.values.to(torch.bfloat16))


# ------------------------------------------------------------------ nm_linear backward

BACKWARD = [
    # n, m, k, o, lead, dtype
    (2, 4, 64, 7, (3,), torch.float32),      # AVX-512 path (when available)
    (2, 4, 36, 5, (2, 3), torch.float32),
    (2, 4, 4, 1, (), torch.float32),         # in_features == m, 1-D x
    (3, 8, 24, 3, (4,), torch.float32),
    (4, 8, 40, 9, (0,), torch.float32),      # batch 0
    (3, 16, 48, 2, (2, 1, 3), torch.float32),
    (1, 4, 20, 11, (5,), torch.float32),
    (2, 4, 64, 7, (3,), torch.bfloat16),
    (3, 8, 24, 5, (2, 2), torch.bfloat16),
]


@pytest.mark.parametrize("n,m,k,o,lead,dtype", BACKWARD)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("noncontig", [False, True])
def test_backward_matches_dense_autograd(n, m, k, o, lead, dtype, with_bias, noncontig):
    g = gen(o * 13 + k)
    nmt, _ = packed(o, k, n, m, dtype, seed=k)
    x0 = torch.randn(*lead, k, generator=g).to(dtype)
    if noncontig and x0.dim() >= 2:
        x0 = x0.transpose(0, -1).contiguous().transpose(0, -1)
    b0 = torch.randn(o, generator=g).to(dtype) if with_bias else None
    gy = torch.randn(*lead, o, generator=g).to(dtype)

    x = x0.clone().requires_grad_()
    vals = nmt.values.clone().requires_grad_()
    b = b0.clone().requires_grad_() if with_bias else None
    nm_linear(x, nmt, b, values=vals).backward(gy)

    xr = x0.clone().requires_grad_()
    vr = nmt.values.clone().requires_grad_()
    br = b0.clone().requires_grad_() if with_bias else None
    w_dense = torch.zeros(o, k, dtype=dtype).scatter(1, nmt.positions(), vr)
    F.linear(xr.float(), w_dense.float(), None if br is None else br.float()).backward(gy.float())

    assert x.grad.dtype == dtype and vals.grad.dtype == dtype
    assert x.grad.shape == x.shape and vals.grad.shape == vals.shape
    close(x.grad, xr.grad, dtype, o)
    close(vals.grad, vr.grad, dtype, max(1, x0.numel() // k))
    if with_bias:
        close(b.grad, br.grad, dtype, max(1, x0.numel() // k))


def test_backward_only_to_requested_inputs():
    nmt, w = packed(6, 32)
    x = torch.randn(3, 32, generator=gen(3), requires_grad=True)
    y = nm_linear(x, nmt)  # weight values are a plain tensor: only x gets a gradient
    y.sum().backward()
    close(x.grad, torch.ones(3, 6) @ w, torch.float32, 6)
    vals = nmt.values.clone().requires_grad_()
    x2 = torch.randn(3, 32, generator=gen(4))
    nm_linear(x2, nmt, values=vals).sum().backward()
    expected = torch.gather(torch.ones(6, 3) @ x2, 1, nmt.positions())
    close(vals.grad, expected, torch.float32, 3)


# ------------------------------------------------------------------ NaN / Inf

@pytest.mark.parametrize("k", [64, 36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_weights_propagate_like_dense(k, dtype):
    g = gen(5)
    w = torch.randn(6, k, generator=g)
    w[0, 3] = math.nan
    w[1, 10] = math.inf
    w[2, 20] = -math.inf
    w[3, 5], w[3, 6] = math.inf, -math.inf      # same group: inf - inf or inf + inf
    w[4, 0], w[4, 1] = math.nan, math.inf
    w = w.to(dtype)
    nmt = NMTensor.from_dense(w, 2, 4)
    dense = nmt.to_dense()
    assert math.isnan(dense[0, 3]) and dense[1, 10] == math.inf and dense[2, 20] == -math.inf
    x = torch.randn(5, k, generator=g)
    x[0, 10] = 0.0            # inf * 0 = nan
    x[1, 6] = -x[1, 6].abs()  # row 3: same-sign infinities for batch row 1
    x[1, 5] = x[1, 5].abs()
    x = x.to(dtype)
    y = nm_linear(x, nmt).float()
    ref = F.linear(x.float(), dense.float())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
    assert bool(torch.isnan(y[:, 0]).all()) and bool(torch.isnan(y[0, 1]))
    assert bool(torch.isinf(y[1, 3]))
    fin = torch.isfinite(ref)
    close(y[fin], ref[fin], dtype, k)


# ------------------------------------------------------------------ bad input

@pytest.fixture
def no_kernel(monkeypatch):
    calls = []

    def boom(*a, **kw):
        calls.append(a)
        raise AssertionError("a kernel ran before the input check")

    monkeypatch.setattr(nm_functional, "nm_matmul", boom)
    monkeypatch.setattr(nm_functional, "reference_matmul", boom)
    return calls


def test_bad_input_is_rejected_before_any_kernel(no_kernel):
    nmt, w = packed(4, 16)
    x = torch.randn(3, 16)
    cases = [
        (TypeError, "float64", lambda: nm_linear(x.double(), nmt)),
        (TypeError, "bfloat16", lambda: nm_linear(x.bfloat16(), nmt)),
        (TypeError, "floating-point", lambda: nm_linear(torch.ones(3, 16, dtype=torch.int64), nmt)),
        (TypeError, "floating-point", lambda: nm_linear(torch.ones(3, 16, dtype=torch.int32), nmt)),
        (TypeError, "torch.Tensor", lambda: nm_linear([[0.0] * 16], nmt)),
        (ValueError, "in_features=16", lambda: nm_linear(torch.randn(3, 12), nmt)),
        (ValueError, "in_features=16", lambda: nm_linear(torch.randn(16, 3), nmt)),
        (ValueError, "in_features=16", lambda: nm_linear(torch.tensor(1.0), nmt)),
        (ValueError, "bias must have shape", lambda: nm_linear(x, nmt, torch.zeros(5))),
        (ValueError, "bias must have shape", lambda: nm_linear(x, nmt, torch.zeros(1, 4))),
        (ValueError, "bias must have shape", lambda: nm_linear(x, nmt, [0.0] * 4)),
        (TypeError, "bias is", lambda: nm_linear(x, nmt, torch.zeros(4, dtype=torch.float64))),
        (TypeError, "NMTensor", lambda: nm_linear(x, w)),
        (TypeError, "NMTensor", lambda: nm_linear(x, None)),
        (ValueError, "backend", lambda: nm_linear(x, nmt, backend="bogus")),
        (ValueError, "values must be", lambda: nm_linear(x, nmt, values=torch.zeros(3))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert no_kernel == []


# ------------------------------------------------------------------ SparseLinear

@pytest.mark.parametrize("n,m,k,o", [(2, 4, 64, 10), (2, 4, 36, 7), (1, 4, 8, 1), (3, 8, 40, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_from_dense_matches_pruned_linear(n, m, k, o, with_bias, dtype):
    torch.manual_seed(k + o)
    lin = nn.Linear(k, o, bias=with_bias, dtype=dtype)
    sl = SparseLinear.from_dense(lin, n, m)
    dense = sl.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == dtype
    assert torch.equal(dense.weight, lin.weight.detach() * nm_mask(lin.weight.detach().abs().float(), n, m).to(dtype))
    assert is_nm(dense.weight, n, m)
    if with_bias:
        assert torch.equal(dense.bias, lin.bias)
    else:
        assert sl.bias is None and dense.bias is None
    for shape in [(k,), (1, k), (6, k), (2, 3, k), (0, k)]:
        x = torch.randn(*shape).to(dtype)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                close(sl(x), dense(x), dtype, k)
    assert f"pattern={n}:{m}" in repr(sl)


def test_sparse_linear_custom_mask():
    torch.manual_seed(1)
    lin = nn.Linear(32, 6)
    mask = nm_mask(torch.rand(6, 32), 2, 4)  # not the magnitude mask
    sl = SparseLinear.from_dense(lin, mask=mask)
    assert torch.equal(sl.to_linear().weight, lin.weight.detach() * mask)
    x = torch.randn(4, 32)
    with torch.no_grad():
        close(sl(x), F.linear(x, lin.weight * mask, lin.bias), torch.float32, 32)
    with pytest.raises(ValueError):
        SparseLinear.from_dense(lin, mask=torch.ones(6, 32, dtype=torch.bool))


def test_sparse_linear_config_and_constructor_validation():
    assert NMConfig() == NMConfig(2, 4, True)
    assert NMConfig(n=3, m=8).m == 8
    for kw in [dict(n=4, m=4), dict(n=0), dict(m=17), dict(n=5, m=4)]:
        with pytest.raises(ValueError):
            NMConfig(**kw)
    for kw in [dict(n=2.0), dict(m="4"), dict(dense_fallback=1), dict(dense_fallback="yes"),
               dict(dense_fallback=None)]:
        with pytest.raises(TypeError):
            NMConfig(**kw)
    with pytest.raises(ValueError, match="not divisible"):
        SparseLinear(30, 4)
    with pytest.raises(ValueError, match="not divisible"):
        SparseLinear(16, 4, config=NMConfig(1, 3))
    with pytest.raises(TypeError):
        SparseLinear.from_dense(nn.Conv1d(4, 4, 1))
    sl = SparseLinear(16, 4, bias=False, config=NMConfig(1, 8), dtype=torch.bfloat16)
    assert sl.values.dtype == torch.bfloat16 and sl.bias is None
    assert tuple(sl.values.shape) == (4, 2) and sl(torch.zeros(2, 16, dtype=torch.bfloat16)).abs().sum() == 0
    # the config passed to from_dense wins over n, m
    sl = SparseLinear.from_dense(nn.Linear(16, 4), n=2, m=4, config=NMConfig(1, 4))
    assert (sl.weight_nm.n, sl.weight_nm.m) == (1, 4)


@pytest.mark.parametrize("n,m,k", [(2, 4, 64), (3, 8, 24)])
def test_training_keeps_pattern_and_reduces_loss(n, m, k):
    torch.manual_seed(0)
    teacher = nn.Linear(k, 5)
    sl = SparseLinear.from_dense(nn.Linear(k, 5), n, m)
    indices0 = sl.indices.clone()
    pruned = sl.to_linear().weight == 0
    x = torch.randn(32, k)
    target = teacher(x).detach()
    opt = torch.optim.SGD(sl.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(sl(x), target)
        loss.backward()
        assert sl.values.grad is not None and sl.bias.grad is not None
        opt.step()
        losses.append(loss.item())
        w = sl.to_linear().weight
        assert is_nm(w, n, m)
        assert bool((w[pruned] == 0).all())  # pruned positions stay exactly zero
        assert torch.equal(sl.indices, indices0)
    assert losses[-1] < 0.9 * losses[0]
    # the trained module still matches its dense export
    with torch.no_grad():
        close(sl(x), sl.to_linear()(x), torch.float32, k)


def test_state_dict_round_trip():
    torch.manual_seed(2)
    sl = SparseLinear.from_dense(nn.Linear(64, 12), config=NMConfig(2, 4))
    sd = sl.state_dict()
    assert set(sd) == {"values", "indices", "bias"}
    fresh = SparseLinear(64, 12, config=NMConfig(2, 4))
    fresh.load_state_dict(sd)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), sl(x))
        assert torch.equal(fresh(x[0]), sl(x[0]))
    assert torch.equal(fresh.to_linear().weight, sl.to_linear().weight)


def test_state_dict_load_after_use_uses_new_pattern():
    torch.manual_seed(3)
    sl = SparseLinear.from_dense(nn.Linear(32, 8))
    fresh = SparseLinear(32, 8)
    fresh.to_linear()  # any use that caches the positions of the (all-zero) initial pattern
    fresh.load_state_dict(sl.state_dict())
    assert torch.equal(fresh.to_linear().weight, sl.to_linear().weight)


@pytest.fixture
def f_linear_calls(monkeypatch):
    """Count calls of torch.nn.functional.linear (the dense path); references below use matmul."""
    calls = []
    real = F.linear

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    return calls


def dense_ref(sl, x):
    """x @ W.T + b in float32 (no F.linear), W the module's pruned dense weight."""
    w = sl.weight_nm.to_dense().float()
    y = x.float() @ w.T
    return y if sl.bias is None else y + sl.bias.detach().float()


def test_dense_fallback_above_crossover(monkeypatch, f_linear_calls):
    xover_calls = []
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", lambda w, refresh=False: xover_calls.append(w.shape) or (1,))
    torch.manual_seed(4)
    sl = SparseLinear.from_dense(nn.Linear(32, 6))
    with torch.no_grad():
        for shape in [(1, 32), (32,)]:
            x = torch.randn(*shape)
            close(sl(x), dense_ref(sl, x), torch.float32, 32)
        assert f_linear_calls == []                      # batch 1: never the dense path
        for shape in [(2, 32), (3, 32), (2, 2, 32), (9, 32)]:
            x = torch.randn(*shape)
            close(sl(x), dense_ref(sl, x), torch.float32, 32)
        assert f_linear_calls == [(2, 32), (3, 32), (2, 2, 32), (9, 32)]  # batch >= 2: dense path
    assert xover_calls == [(6, 32)]                      # measured once per module
    # with gradients enabled the packed path is used (training never takes the dense path)
    f_linear_calls.clear()
    x = torch.randn(4, 32)
    close(sl(x), dense_ref(sl, x), torch.float32, 32)
    assert f_linear_calls == []


def test_dense_fallback_disabled_never_asks_for_crossover(monkeypatch, f_linear_calls):
    def boom(*a, **kw):
        raise AssertionError("kernel_batches called with dense_fallback=False")

    monkeypatch.setattr(nm_linear_mod, "kernel_batches", boom)
    torch.manual_seed(5)
    sl = SparseLinear.from_dense(nn.Linear(32, 6), config=NMConfig(dense_fallback=False))
    with torch.no_grad():
        for b in (1, 2, 64, 300):
            x = torch.randn(b, 32)
            close(sl(x), dense_ref(sl, x), torch.float32, 32)
    assert f_linear_calls == []  # always the packed kernel


def test_dense_fallback_sees_updated_values(monkeypatch):
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", lambda w, refresh=False: (1,))
    torch.manual_seed(6)
    sl = SparseLinear.from_dense(nn.Linear(32, 6))
    x = torch.randn(4, 32)
    with torch.no_grad():
        sl(x)  # materialises the dense copy
    opt = torch.optim.SGD(sl.parameters(), lr=0.5)
    sl(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        close(sl(x), sl.to_linear()(x), torch.float32, 32)


def test_dtype_change_drops_caches(monkeypatch, f_linear_calls):
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", lambda w, refresh=False: (1,))
    torch.manual_seed(7)
    sl = SparseLinear.from_dense(nn.Linear(32, 6))
    with torch.no_grad():
        x = torch.randn(3, 32)
        close(sl(x), dense_ref(sl, x), torch.float32, 32)  # materialises an fp32 dense copy
    assert len(f_linear_calls) == 1
    sl = sl.to(torch.bfloat16)
    assert sl.weight_nm.dtype == torch.bfloat16
    xb = x.bfloat16()
    with torch.no_grad():
        y = sl(xb)
    assert y.dtype == torch.bfloat16 and len(f_linear_calls) == 2
    close(y, dense_ref(sl, xb).bfloat16(), torch.bfloat16, 32)


# ------------------------------------------------------------------ crossover_batch

@pytest.fixture
def real_dispatch(monkeypatch):
    """Undo the autouse stub: these tests measure (with a fake or tiny compare) and cache."""
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", real_kernel_batches)

def test_crossover_batch_is_measured_once_and_cached(tmp_path, monkeypatch, real_dispatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    nmt, _ = packed(8, 32)
    first = real_crossover_batch(nmt)
    assert isinstance(first, int) and first >= 1
    wins = real_kernel_batches(nmt)
    table = json.loads((tmp_path / "nm_dispatch.json").read_text())
    (mask,) = table.values()  # one measurement served both calls
    assert wins == tuple(b for i, b in enumerate(_PROBE_BATCHES) if mask >> i & 1)
    assert first == next((b for b in _PROBE_BATCHES if b not in wins), NEVER)
    (key,) = table
    assert "8x32" in key and "float32" in key and "2:4" in key

    def no_measure(*a, **kw):
        raise AssertionError("crossover_batch re-measured a cached shape")

    monkeypatch.setattr(sparsewise.bench, "compare", no_measure)
    assert real_crossover_batch(nmt) == first
    assert real_crossover_batch(NMTensor.from_dense(torch.randn(8, 32))) == first  # same shape, same key


def test_crossover_batch_is_measured_again_for_new_kernels(tmp_path, monkeypatch, real_dispatch):
    # a faster kernel moves the crossover: an entry cached for other kernels is not reused
    import sparsewise.nm.kernels as kernels

    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(sparsewise.bench, "compare", lambda c, b, **kw: SimpleNamespace(ratio=0.5))
    nmt, _ = packed(8, 32)
    assert real_crossover_batch(nmt) == 1
    monkeypatch.setattr(kernels, "KERNELS_VERSION", kernels.KERNELS_VERSION + 1)
    monkeypatch.setattr(sparsewise.bench, "compare", lambda c, b, **kw: SimpleNamespace(ratio=3.0))
    assert real_crossover_batch(nmt) == NEVER
    assert len(json.loads((tmp_path / "nm_dispatch.json").read_text())) == 2


def test_crossover_batch_refresh_and_table(tmp_path, monkeypatch, real_dispatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    calls = []

    def fake_compare(candidate, baseline, **kw):
        calls.append(1)
        return SimpleNamespace(ratio=2.0 if len(calls) < 4 else 0.5)  # dense wins from the 4th batch (8)

    monkeypatch.setattr(sparsewise.bench, "compare", fake_compare)
    nmt, _ = packed(8, 32)
    assert real_crossover_batch(nmt) == 8 and len(calls) == 5  # two losses in a row end the probe
    assert real_kernel_batches(nmt) == (1, 2, 4) and len(calls) == 5  # cached
    calls.clear()
    monkeypatch.setattr(sparsewise.bench, "compare", lambda c, b, **kw: SimpleNamespace(ratio=3.0))
    assert real_crossover_batch(nmt, refresh=True) == NEVER  # packed wins everywhere
    other = NMTensor.from_dense(torch.randn(4, 16, dtype=torch.bfloat16))
    assert real_crossover_batch(other) == NEVER
    table = json.loads((tmp_path / "nm_dispatch.json").read_text())
    assert sorted(table.values()) == [2 ** len(_PROBE_BATCHES) - 1] * 2 and len(table) == 2
    # a damaged cache file is ignored and rewritten
    (tmp_path / "nm_dispatch.json").write_text("{not json")
    assert real_crossover_batch(nmt) == NEVER
    assert len(json.loads((tmp_path / "nm_dispatch.json").read_text())) == 1


def test_kernel_batches_keep_wins_after_a_loss(tmp_path, monkeypatch, real_dispatch):
    # torch's dense GEMM can be fast at batch 1 and slow at 8-32 (bf16 on CPUs without native
    # support): the kernel loses at 1 and wins from 2, which one crossover cannot express
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    ratios = iter([0.98, 2.0, 1.04, 2.5, 0.7, 0.6, 3.0])  # the 7th is never asked for
    calls = []
    monkeypatch.setattr(sparsewise.bench, "compare",
                        lambda c, b, **kw: calls.append(1) or SimpleNamespace(ratio=next(ratios)))
    nmt, _ = packed(8, 32)
    assert real_kernel_batches(nmt) == (2, 8) and len(calls) == 6
    assert real_crossover_batch(nmt) == 1 and len(calls) == 6  # read from the same cache entry


def test_sparselinear_follows_the_win_set(monkeypatch, f_linear_calls):
    monkeypatch.setattr(nm_linear_mod, "kernel_batches", lambda w, refresh=False: (2, 4, 64))
    torch.manual_seed(8)
    sl = SparseLinear.from_dense(nn.Linear(32, 6))
    expect = {1: "dense", 2: "kernel", 3: "kernel", 5: "kernel", 8: "dense", 63: "dense", 64: "kernel",
              127: "kernel", 128: "dense", 5000: "dense"}
    with torch.no_grad():
        for b, path in expect.items():
            f_linear_calls.clear()
            x = torch.randn(b, 32)
            close(sl(x), dense_ref(sl, x), torch.float32, 32)
            assert (f_linear_calls == [(b, 32)]) == (path == "dense"), b
            assert sl.cpu_path(b) == path
    with pytest.raises(ValueError, match="positive int"):
        sl.cpu_path(0)
    off = SparseLinear.from_dense(nn.Linear(32, 6), config=NMConfig(dense_fallback=False))
    assert off.cpu_path(1) == "kernel"


# ------------------------------------------------------------------ sparsify_

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))
        self.head = nn.Linear(12, 10)
        self.odd = nn.Linear(10, 8)  # in_features=10 is not divisible by 4

    def forward(self, x):
        return self.odd(torch.relu(self.head(self.body(x))))


def pruned_copy(model, names, n=2, m=4):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            lin = ref.get_submodule(name)
            lin.weight.mul_(nm_mask(lin.weight.abs(), n, m))
    return ref


def test_sparsify_nested_model():
    torch.manual_seed(8)
    model = Net()
    ref = pruned_copy(model, ["body.0", "body.2", "head"])
    report = sparsify_(model)
    assert isinstance(report, SparsifyReport)
    assert report.swapped == ["body.0", "body.2", "head"]
    assert report.skipped == {"odd": "in_features=10 is not divisible by m=4"}
    assert isinstance(model.body[0], SparseLinear) and isinstance(model.body[2], SparseLinear)
    assert isinstance(model.head, SparseLinear) and type(model.odd) is nn.Linear
    assert str(report).startswith("swapped 3 layer(s), skipped 1") and "odd" in str(report)
    for b in (1, 5):
        x = torch.randn(b, 16)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    # a second pass has nothing left to swap
    again = sparsify_(model)
    assert again.swapped == [] and list(again.skipped) == ["odd"]


def test_sparsify_filter_fn_and_pattern():
    torch.manual_seed(9)
    model = Net()
    seen = []

    def keep(name, module):
        seen.append((name, type(module)))
        return name != "head"

    ref = pruned_copy(model, ["body.0", "body.2"], 1, 4)
    report = sparsify_(model, NMConfig(1, 4), filter_fn=keep)
    assert report.swapped == ["body.0", "body.2"]
    assert report.skipped == {"head": "excluded by filter_fn", "odd": "in_features=10 is not divisible by m=4"}
    assert ("head", nn.Linear) in seen and all(t is nn.Linear for _, t in seen)
    assert type(model.head) is nn.Linear and model.body[0].weight_nm.n == 1
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_sparsify_skips_unsupported_dtype():
    model = nn.Sequential(nn.Linear(8, 4).double(), nn.Linear(4, 4))
    report = sparsify_(model)
    assert report.swapped == ["1"]
    assert "float64" in report.skipped["0"]


def test_sparsify_model_without_linear():
    model = nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1))
    report = sparsify_(model)
    assert report.swapped == [] and list(report.skipped) == ["<model>"]
    assert "no nn.Linear" in report.skipped["<model>"]


def test_sparsify_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify_("model")
    with pytest.raises(TypeError, match="NMConfig"):
        sparsify_(nn.Linear(8, 4), {"n": 2, "m": 4})
    with pytest.raises(TypeError, match="NMConfig"):
        sparsify_(nn.Sequential(nn.Linear(8, 4)), (2, 4))


def test_sparsify_top_level_linear_does_not_claim_a_fake_swap():
    torch.manual_seed(10)
    lin = nn.Linear(8, 4)
    ref = pruned_copy(lin, [""])
    report = sparsify_(lin)
    assert "" not in dict(lin.named_children())
    x = torch.randn(2, 8)
    with torch.no_grad():
        if report.swapped:  # if it says it swapped, the output must be the pruned one
            torch.testing.assert_close(lin(x), ref(x))
        else:
            assert report.skipped
