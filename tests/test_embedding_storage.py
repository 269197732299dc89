"""Quantized rows: documented error bounds, quantized lookups vs the reference, KeyedJagged helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsewise.embedding import EmbeddingBagCollection, KeyedJagged, TableConfig
from sparsewise.embedding.storage import alloc_rows, dequantize_rows, quantize_rows


def _rows(n, d, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 37), scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 99))
def test_int8_error_bound(n, d, scale, seed):
    w = _rows(n, d, scale, seed)
    q = quantize_rows(w, "int8")
    assert q.shape == (n, (d + 3) // 4 * 4 + 8) and q.dtype == torch.uint8
    back = dequantize_rows(q, "int8", d)
    bound = (w.amax(1) - w.amin(1)) / 510 * (1 + 1e-4) + 1e-6 * w.abs().amax(1)
    assert bool(((back - w).abs() <= bound[:, None]).all())


@pytest.mark.parametrize("dtype, rel", [("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11)])
def test_half_error_bounds(dtype, rel):
    w = _rows(200, 33, 10.0)
    w = torch.where(w.abs() < 2 ** -14, torch.full_like(w, 0.5), w)  # normal fp16 range for the relative bound
    back = dequantize_rows(quantize_rows(w, dtype), dtype, 33)
    assert bool(((back - w).abs() <= rel * w.abs()).all())


def test_fp16_overflow_and_nan_refused():
    with pytest.raises(ValueError, match="does not fit fp16"):
        quantize_rows(torch.tensor([[1e5, 0.0]]), "fp16")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rows(torch.tensor([[float("nan"), 0.0]]), "int8")


def test_constant_row_is_exact_in_int8():
    w = torch.full((3, 5), 0.25)
    torch.testing.assert_close(dequantize_rows(quantize_rows(w, "int8"), "int8", 5), w)


def test_huge_page_allocation_is_usable():
    t = alloc_rows(40_000, 64, "fp32")  # 10 MB: mapped with huge pages advised
    t.fill_(1.5)
    assert t.shape == (40_000, 64) and t.is_contiguous() and float(t.sum()) == 1.5 * t.numel()


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
def test_quantized_collection_matches_reference_and_bound(dtype, pooling, dedup):
    rng = np.random.default_rng(0)
    cfgs = [TableConfig("a", 300, 19, ("x", "y"), pooling=pooling, init="normal"),
            TableConfig("b", 50, 8, ("z",), pooling="sum", init="normal", seed=5)]
    ebc = EmbeddingBagCollection(cfgs, dedup=dedup)
    q = ebc.quantize(dtype)
    assert q.tables[0].dtype == dtype and not q.training
    bags = {k: [rng.integers(0, n, rng.integers(0, 6)).tolist() for _ in range(11)]
            for k, n in (("x", 300), ("y", 300), ("z", 50))}
    w = {k: [rng.uniform(0.5, 2, len(b)).tolist() for b in v] for k, v in bags.items()}
    kj = KeyedJagged.from_lists(bags, weights=w)
    got = q(kj).values
    torch.testing.assert_close(got, q(kj, backend="reference").values, rtol=1e-5, atol=1e-5)
    exact = ebc(kj).values
    # the pooled error stays within the per-row bound summed over each bag (times the weights)
    per_row = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -10}.get(dtype)
    lim = 0.0
    for t in ebc.tables:
        full = ebc.dequantized(t.name)
        if per_row is not None:
            lim = max(lim, float(full.abs().max()) * per_row)
        else:
            lim = max(lim, float((full.amax(1) - full.amin(1)).max()) / 510)
    assert float((got - exact).abs().max()) <= lim * 2 * 5 + 1e-5  # weights <= 2, bags <= 5 ids


def test_quantize_only_from_fp32_and_names_checked():
    ebc = EmbeddingBagCollection([TableConfig("a", 10, 4), TableConfig("b", 10, 4)])
    mixed = ebc.quantize({"a": "int8"})
    assert [t.dtype for t in mixed.tables] == ["int8", "fp32"]
    with pytest.raises(ValueError, match="already int8"):
        mixed.quantize("bf16")
    with pytest.raises(KeyError, match="unknown tables"):
        ebc.quantize({"zz": "bf16"})


def test_keyed_jagged_views():
    kj = KeyedJagged.from_lists({"u": [[1], [2, 3]], "g": [[], [4]]})
    assert kj.batch_size == 2 and len(kj) == 2
    v, l = kj["g"]
    assert v.tolist() == [4] and l.tolist() == [0, 1]
    assert kj.offsets.tolist() == [0, 1, 3, 3, 4]
    k2 = KeyedJagged(["u", "g"], kj.values, offsets=kj.offsets)
    assert k2.lengths.tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError, match="same batch size"):
        KeyedJagged.from_lists({"u": [[1]], "g": [[], []]})
    with pytest.raises(ValueError, match="offsets or lengths"):
        KeyedJagged(["u"], torch.tensor([1]))
    assert "batch_size=2" in repr(kj)


def test_output_rows_reuses_only_mappings_nothing_references():
    import gc

    from sparsewise.embedding import storage

    rows, width = 4096, 1024  # 16 MB: above HUGE_MIN_BYTES
    a = storage.output_rows(rows, width)
    a.fill_(1.0)
    view = a[:, :8]  # a view keeps the mapping in use after its base tensor is gone
    addr = a.data_ptr()
    del a
    gc.collect()
    b = storage.output_rows(rows, width)
    assert b.data_ptr() != addr and float(view.sum()) == rows * 8
    b.fill_(2.0)
    assert float(view.sum()) == rows * 8  # untouched by the new output
    del view, b
    gc.collect()
    c = storage.output_rows(rows, width)
    assert c.shape == (rows, width) and c.dtype == torch.float32
    assert sum(len(m) for m in storage._pool) <= storage.OUTPUT_POOL_BYTES
    small = storage.output_rows(3, 5)
    assert small.shape == (3, 5)


def test_forward_outputs_stay_valid_across_calls():
    from sparsewise.embedding import EmbeddingBagCollection, KeyedJagged, TableConfig

    # 2048 x 1024 fp32 outputs: 8 MB, pooled mappings
    ebc = EmbeddingBagCollection([TableConfig(f"t{t}", 100, 128, (f"f{t}",), init="normal", seed=t) for t in range(8)]).eval()
    gen = torch.Generator().manual_seed(0)

    def batch():
        return KeyedJagged([f"f{t}" for t in range(8)], torch.randint(0, 100, (8 * 2048 * 2,), generator=gen),
                           lengths=torch.full((8 * 2048,), 2))

    k1, k2 = batch(), batch()
    o1 = ebc(k1).values
    ref1 = ebc(k1, backend="reference").values
    o2 = ebc(k2).values
    torch.testing.assert_close(o1, ref1)  # the second call did not write into the first output
    torch.testing.assert_close(o2, ebc(k2, backend="reference").values)
    del o1
    o3 = ebc(k1).values  # may reuse o1's mapping: fully overwritten
    torch.testing.assert_close(o3, ref1)
