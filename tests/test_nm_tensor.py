"""NMTensor: packing round trips, masks, sizes, and safetensors persistence (including damage)."""
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsewise.nm import NMTensor, is_nm, nm_mask
from sparsewise.nm.tensor import FORMAT_NAME, index_bits

PROPS = settings(max_examples=30, deadline=None)
DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16)):
    m = draw(st.integers(2, 16))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 7))
    groups = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, rows, groups * m, dtype, seed


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_layout(p: NMTensor, n, m, o, k, dtype):
    nk = k // m * n
    assert (p.n, p.m, p.shape, p.dtype) == (n, m, (o, k), dtype)
    assert tuple(p.values.shape) == (o, nk)
    assert p.indices.dtype == torch.uint8
    assert tuple(p.indices.shape) == (o, math.ceil(nk * index_bits(m) / 8))
    pos = p.positions()
    assert tuple(pos.shape) == (o, nk)
    local = (pos % m).reshape(o, k // m, n)
    group = (pos // m).reshape(o, k // m, n)
    assert torch.equal(group, torch.arange(k // m).view(1, -1, 1).expand(o, -1, n))
    if n > 1:
        assert bool((local[..., 1:] > local[..., :-1]).all())  # strictly increasing in a group


# ------------------------------------------------------------------ round trips

@PROPS
@given(cases())
def test_from_dense_to_dense_round_trip(case):
    n, m, o, k, dtype, seed = case
    w = randn(o, k, seed=seed, dtype=dtype)
    p = NMTensor.from_dense(w, n, m)
    check_layout(p, n, m, o, k, dtype)
    expected = w * nm_mask(w.abs().float(), n, m).to(dtype)
    d = p.to_dense()
    assert d.dtype == dtype
    assert torch.equal(d, expected)
    assert is_nm(d, n, m)


@PROPS
@given(cases(), st.floats(0.0, 1.0))
def test_already_nm_weight_round_trips_exactly(case, drop):
    n, m, o, k, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = randn(o, k, seed=seed, dtype=dtype)
    # an arbitrary (not magnitude) N:M mask, then drop some kept entries too (fewer than n)
    keep = nm_mask(torch.rand(o, k, generator=gen), n, m) & (torch.rand(o, k, generator=gen) >= drop)
    w = torch.where(keep, w, torch.zeros((), dtype=dtype))
    p = NMTensor.from_dense(w, n, m)
    assert torch.equal(p.to_dense(), w)
    check_layout(p, n, m, o, k, dtype)


@PROPS
@given(cases())
def test_custom_exact_mask(case):
    n, m, o, k, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = randn(o, k, seed=seed, dtype=dtype)
    mask = nm_mask(torch.rand(o, k, generator=gen), n, m)  # exactly n per group, not by magnitude
    p = NMTensor.from_dense(w, n, m, mask=mask)
    assert torch.equal(p.to_dense(), torch.where(mask, w, torch.zeros((), dtype=dtype)))
    assert torch.equal(p.positions() % m, mask.reshape(o, -1, m).nonzero()[:, 2].reshape(o, -1))


def test_fp16_and_non_contiguous_weight():
    w = randn(12, 6, seed=3).T  # (6, 12) non-contiguous
    p = NMTensor.from_dense(w, 2, 4)
    assert torch.equal(p.to_dense(), w * nm_mask(w.abs(), 2, 4))
    h = randn(5, 16, seed=4, dtype=torch.float16)
    ph = NMTensor.from_dense(h, 3, 8)
    assert ph.dtype == torch.float16
    assert torch.equal(ph.to_dense(), h * nm_mask(h.abs().float(), 3, 8).half())


def test_nan_is_kept_by_the_magnitude_mask():
    w = torch.tensor([[math.nan, 1.0, 2.0, 3.0, 0.0, -math.inf, 1.0, 0.5]])
    d = NMTensor.from_dense(w, 2, 4).to_dense()
    assert math.isnan(d[0, 0]) and d[0, 3] == 3.0 and d[0, 1] == 0 and d[0, 2] == 0
    assert d[0, 5] == -math.inf and d[0, 6] == 1.0


def test_mask_with_fewer_kept_than_n_is_accepted_and_n_m():
    w = randn(3, 8, seed=1)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 1] = True           # group keeps 1 < n
    mask[1, [4, 7]] = True      # exactly n
    mask[2, 2] = True
    mask[2, 5] = True
    p = NMTensor.from_dense(w, 2, 4, mask=mask)
    d = p.to_dense()
    assert is_nm(d, 2, 4)
    assert torch.equal(d[mask], w[mask])  # every kept value survives
    check_layout(p, 2, 4, 3, 8, torch.float32)


def test_mask_with_fewer_kept_than_n_fills_zeros():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[True, False, False, False], [False, False, False, False]])
    p = NMTensor.from_dense(w, 2, 4, mask=mask)
    assert torch.equal(p.to_dense(), w * mask)


def test_mask_validation():
    w = randn(2, 8)
    bad = torch.zeros(2, 8, dtype=torch.bool)
    bad[1, :3] = True  # 3 kept in a group of 4
    with pytest.raises(ValueError, match="not 2:4"):
        NMTensor.from_dense(w, 2, 4, mask=bad)
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        NMTensor.from_dense(w, 2, 4, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        NMTensor.from_dense(w, 2, 4, mask=[[1, 0, 0, 1] * 2] * 2)
    # a float 0/1 mask is accepted like a bool one
    ok = nm_mask(w.abs(), 2, 4)
    assert torch.equal(NMTensor.from_dense(w, 2, 4, mask=ok.float()).to_dense(), w * ok)


def test_from_dense_bad_input():
    with pytest.raises(TypeError):
        NMTensor.from_dense([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="2-D"):
        NMTensor.from_dense(torch.ones(8))
    with pytest.raises(ValueError, match="2-D"):
        NMTensor.from_dense(torch.ones(2, 2, 8))
    with pytest.raises(TypeError):
        NMTensor.from_dense(torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError):
        NMTensor.from_dense(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="not divisible"):
        NMTensor.from_dense(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError):
        NMTensor.from_dense(torch.ones(2, 8), 4, 4)
    with pytest.raises(TypeError):
        NMTensor.from_dense(torch.ones(2, 8), 2.0, 4)


def test_constructor_validation():
    p = NMTensor.from_dense(randn(4, 16), 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        NMTensor(p.values[:, :-1], p.indices, 2, 4, (4, 16))
    with pytest.raises(ValueError, match="indices must be uint8"):
        NMTensor(p.values, p.indices.to(torch.int8), 2, 4, (4, 16))
    with pytest.raises(ValueError, match="indices must be uint8"):
        NMTensor(p.values, p.indices[:, :1], 2, 4, (4, 16))
    with pytest.raises(TypeError):
        NMTensor(p.values.double(), p.indices, 2, 4, (4, 16))
    with pytest.raises(ValueError, match="not divisible"):
        NMTensor(p.values, p.indices, 2, 4, (4, 18))


def test_with_values_and_to_share_the_pattern():
    p = NMTensor.from_dense(randn(5, 24, seed=2), 3, 8)
    q = p.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.indices is p.indices
    assert torch.equal(q.to_dense(), p.to_dense().to(torch.bfloat16))
    r = p.with_values(torch.ones_like(p.values))
    assert torch.equal(r.to_dense(), torch.zeros(5, 24).scatter(1, p.positions(), 1.0))
    assert r.to_dense().sum() == 5 * 9  # 3 kept per group of 8, 3 groups, 5 rows
    assert "3:8" in repr(p)


# ------------------------------------------------------------------ sizes

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (3, 16), (1, 2), (2, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("o,groups", [(3, 5), (8, 4)])
def test_nbytes_is_values_plus_packed_indices(n, m, dtype, o, groups):
    k = groups * m
    p = NMTensor.from_dense(randn(o, k, dtype=dtype), n, m)
    nk = k // m * n
    esize = torch.tensor([], dtype=dtype).element_size()
    expected = o * nk * esize + o * math.ceil(nk * index_bits(m) / 8)
    assert p.nbytes == expected


@pytest.mark.parametrize("k", [16, 32, 48, 160])
def test_nbytes_24_ratio(k):
    o = 6
    bf = NMTensor.from_dense(randn(o, k, dtype=torch.bfloat16))
    assert bf.nbytes * 16 == 9 * (o * k * 2)  # 9/16 of dense bf16
    f32 = NMTensor.from_dense(randn(o, k))
    assert f32.nbytes * 32 == 17 * (o * k * 4)  # (1/2 + 1/32) of dense fp32


def test_index_bits():
    assert [index_bits(m) for m in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 3, 3, 4, 4]


# ------------------------------------------------------------------ persistence

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16), (2, 6), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip(tmp_path, n, m, dtype):
    p = NMTensor.from_dense(randn(7, 5 * m, seed=n * 31 + m, dtype=dtype), n, m)
    path = tmp_path / "sub" / "w.safetensors"
    assert p.save(path) == path
    q = NMTensor.load(path)
    assert (q.n, q.m, q.shape, q.dtype) == (n, m, p.shape, dtype)
    assert torch.equal(q.values, p.values) and torch.equal(q.indices, p.indices)
    assert torch.equal(q.to_dense(), p.to_dense())
    assert [x.name for x in path.parent.iterdir()] == ["w.safetensors"]  # no temp file left
    # load accepts str paths, and overwriting works
    p2 = NMTensor.from_dense(randn(7, 5 * m, seed=99, dtype=dtype), n, m)
    p2.save(str(path))
    assert torch.equal(NMTensor.load(str(path)).to_dense(), p2.to_dense())


@pytest.fixture
def saved(tmp_path):
    p = NMTensor.from_dense(randn(6, 32, seed=5), 2, 4)
    path = tmp_path / "w.safetensors"
    p.save(path)
    return p, path


def _load_fails_naming(path):
    with pytest.raises(ValueError) as exc:
        NMTensor.load(path)
    assert str(path) in str(exc.value)
    return str(exc.value)


def test_load_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails_naming(path)
    path.write_bytes(data[:5])  # not even a header length
    _load_fails_naming(path)
    path.write_bytes(data[:-1])  # one byte short
    _load_fails_naming(path)


@pytest.mark.parametrize("where", ["length", "json"])
def test_load_flipped_header_bytes(saved, where):
    _, path = saved
    data = bytearray(path.read_bytes())
    span = range(0, 8) if where == "length" else range(8, 16)
    for i in span:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    _load_fails_naming(path)


@pytest.mark.parametrize("content", [random.Random(0).randbytes(300), b"", b"hello, not safetensors\n" * 4])
def test_load_non_safetensors_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    _load_fails_naming(path)


def test_load_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(4, 8)}, str(path), metadata={"format": "pt"})
    msg = _load_fails_naming(path)
    assert "format" in msg
    save_file({"weight": torch.randn(4, 8)}, str(path))  # no metadata at all
    _load_fails_naming(path)


@pytest.mark.parametrize("change", [
    {"version": "2"}, {"version": "x"}, {"n": "two"}, {"shape": "not json"}, {"dtype": "float64"},
    {"dtype": "bfloat16"},  # values are float32
])
def test_load_wrong_metadata(saved, change):
    from safetensors.torch import save_file

    p, path = saved
    tensors, meta = p.state()
    save_file(tensors, str(path), metadata={**meta, **change})
    _load_fails_naming(path)


def test_load_missing_tensor(saved):
    from safetensors.torch import save_file

    p, path = saved
    tensors, meta = p.state()
    save_file({"values": tensors["values"]}, str(path), metadata=meta)
    _load_fails_naming(path)


@pytest.mark.parametrize("change", ["shape", "pattern", "index-dtype"])
def test_load_inconsistent_metadata_names_the_file(saved, change):
    from safetensors.torch import save_file

    p, path = saved
    tensors, meta = p.state()
    if change == "shape":
        meta = {**meta, "shape": "[6, 64]"}
    elif change == "pattern":
        meta = {**meta, "n": "5"}
    else:
        tensors = {**tensors, "indices": tensors["indices"].to(torch.int8)}
    save_file(tensors, str(path), metadata=meta)
    _load_fails_naming(path)


def _corrupt_first_index_byte(p, byte):
    tensors, meta = p.state()
    idx = tensors["indices"].clone()
    idx[0, 0] = byte(int(idx[0, 0]))
    return {**tensors, "indices": idx}, meta


@pytest.mark.parametrize("pattern,byte", [
    # 2:4: 2-bit indices, first group = bits 0-3
    ((2, 4), lambda b: (b & 0xF0) | 1 | (0 << 2)),   # positions (1, 0): decreasing
    ((2, 4), lambda b: (b & 0xF0) | 2 | (2 << 2)),   # positions (2, 2): repeated
    ((4, 8), lambda b: (b & 0xC0) | 3 | (1 << 3)),   # 3-bit indices: (3, 1, ...) decreasing
    ((2, 6), lambda b: (b & 0xC0) | 0 | (7 << 3)),   # 3-bit indices: position 7 >= m=6
])
def test_load_corrupted_indices(tmp_path, pattern, byte):
    from safetensors.torch import save_file

    n, m = pattern
    p = NMTensor.from_dense(randn(4, 4 * m, seed=7), n, m)
    tensors, meta = _corrupt_first_index_byte(p, byte)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    msg = _load_fails_naming(path)
    assert "corrupted indices" in msg


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        NMTensor.load(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(exc.value)
    with pytest.raises(FileNotFoundError):
        NMTensor.load(tmp_path)  # a directory is not a file


def test_save_is_atomic(saved, monkeypatch):
    import safetensors.torch

    p, path = saved
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    other = NMTensor.from_dense(randn(6, 32, seed=6), 2, 4)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before
    assert [x.name for x in path.parent.iterdir()] == [path.name]  # temp file cleaned up
    monkeypatch.undo()
    assert torch.equal(NMTensor.load(path).to_dense(), p.to_dense())
    # a failed first save leaves nothing at all
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    fresh = path.parent / "fresh.safetensors"
    with pytest.raises(OSError):
        other.save(fresh)
    assert not fresh.exists()


def test_state_metadata_and_prefix():
    p = NMTensor.from_dense(randn(3, 16, dtype=torch.bfloat16), 1, 4)
    tensors, meta = p.state("layer.")
    assert set(tensors) == {"layer.values", "layer.indices"}
    assert meta["layer.format"] == FORMAT_NAME and meta["layer.dtype"] == "bfloat16"
    assert (meta["layer.n"], meta["layer.m"], meta["layer.shape"]) == ("1", "4", "[3, 16]")
    q = NMTensor.from_state(tensors, meta, prefix="layer.")
    assert torch.equal(q.to_dense(), p.to_dense())
    with pytest.raises(ValueError, match="src-name"):
        NMTensor.from_state(tensors, meta, source="src-name")  # no prefix -> keys missing


# ------------------------------------------------------------------ compiled 2:4 expander

@PROPS
@given(st.integers(0, 9), st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       st.integers(0, 2**31 - 1))
def test_decompress_24_matches_the_scatter_bit_for_bit(rows, groups, dtype, seed):
    # any number of groups of 4 (odd counts leave half of the last index byte unused), and
    # special values (NaN, +-Inf, -0.0) kept exactly as stored
    from sparsewise.nm.kernels import decompress_24

    w = randn(rows, 4 * groups, seed=seed, dtype=dtype)
    if w.numel():
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
        flat = w.view(-1)
        pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:4]
        flat[pick] = special[:pick.numel()]
    p = NMTensor.from_dense(w, 2, 4)
    want = p.scatter_dense()
    got = p.to_dense()
    bits = {2: torch.int16, 4: torch.int32}[w.element_size()]
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(bits), want.view(bits))
    out = torch.full_like(want, 7.0)  # into a caller's buffer: every element is written
    assert decompress_24(p.values, p.indices, out) is out
    assert torch.equal(out.view(bits), want.view(bits))


def test_decompress_24_rejects_what_does_not_fit():
    from sparsewise.nm.kernels import decompress_24

    p = NMTensor.from_dense(torch.randn(3, 16), 2, 4)
    with pytest.raises(ValueError, match="indices"):
        decompress_24(p.values, p.indices[:, :1])
    with pytest.raises(ValueError, match="out must be"):
        decompress_24(p.values, p.indices, torch.empty(3, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        decompress_24(p.values, p.indices, torch.empty(16, 3).T)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        decompress_24(p.values.double(), p.indices)
    with pytest.raises(ValueError, match=r"\(rows, kept\) values"):
        decompress_24(p.values.reshape(-1), p.indices)
