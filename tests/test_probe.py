import json

import numpy as np

import pytest

from sparsewise.advisor import probe as P


@pytest.fixture(scope="module")
def doc():
    return P.probe(quick=True)


def test_schema(doc):
    assert doc["schema"] == P.PROBE_SCHEMA
    assert set(doc) >= {"machine", "bandwidth", "gather", "gemm", "gemv", "created", "seconds"}
    m = doc["machine"]
    assert set(m["flags"]) == set(P.FLAGS_OF_INTEREST)
    assert all(isinstance(v, bool) for v in m["flags"].values())
    assert m["threads_used"] >= 1 and m["logical_cpus"] >= 1
    json.loads(json.dumps(doc))  # JSON-able


def test_plausible_ranges(doc):
    bw = doc["bandwidth"]
    assert bw["bytes"] >= 256 << 20
    assert 0.5 < bw["read_gbs_1t"] < 2000
    assert 0.5 < bw["read_gbs_all"] < 2000
    for key in ("row64", "row512"):
        g = doc["gather"][key]
        assert g["table_bytes"] >= 4 * (doc["machine"]["llc_bytes"] or 32 << 20)
        assert 1e5 < g["rows_per_s"] < 1e10
        # a random gather cannot beat streaming by much; the margin is wide because the two are
        # timed seconds apart and a shared host's bandwidth moves 2-3x in that time
        assert g["gbs"] < 5 * bw["read_gbs_all"]
        pf = g["prefetched"]
        assert pf["row_bytes"] == int(key[3:]) and pf["table_bytes"] >= 4 * (doc["machine"]["llc_bytes"] or 32 << 20)
        assert pf["prefetch_ids"] in P.PREFETCH_DISTS and pf["gbs"] == max(pf["gbs_by_prefetch"].values())
        assert pf["gbs"] < 5 * bw["read_gbs_all"]
    assert doc["gemm"]["fp32_gflops"] > 1 and doc["gemm"]["bf16_gflops"] > 0.1
    assert 0.1 < doc["gemv"]["fp32_gbs"] < 2000


def test_read_meter_measures_now(doc):
    meter = P.ReadMeter(threads=doc["machine"]["threads_used"])
    assert meter.nbytes >= max(256 << 20, 8 * (doc["machine"]["llc_bytes"] or 32 << 20))  # not cache
    assert 0.5 < meter.gbs(repeats=1) < 2000


def test_format_mentions_every_limit(doc):
    text = P.format_probe(doc)
    for word in ("memory read", "random gather", "GEMM", "GEMV", "flags"):
        assert word in text


def test_cached_probe_reuses_saved_result(doc, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    saved = dict(doc, created="marker")
    P.save_probe(saved)
    assert P.cached_probe()["created"] == "marker"


def test_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    (tmp_path / "probe.json").write_text("{ truncated")
    calls = []
    monkeypatch.setattr(P, "probe", lambda **kw: calls.append(kw) or {"schema": P.PROBE_SCHEMA, "machine": {}})
    P.cached_probe()
    assert len(calls) == 1
    assert json.loads((tmp_path / "probe.json").read_text())["schema"] == P.PROBE_SCHEMA


def test_gather_limit_reads_the_rows_it_is_given():
    import torch

    t = torch.ones(4096, 34, dtype=torch.float32)  # 136 B rows, as int8 rows of dim 128
    r = P.gather_limit(t, 1 << 14, repeats=1, dists=(0, 8))
    assert r["row_bytes"] == 136 and r["table_bytes"] == 4096 * 136
    assert set(r["gbs_by_prefetch"]) == {0, 8} and r["gbs"] > 0
    assert r["rows_per_s"] == pytest.approx(r["gbs"] * 1e9 / 136)
    u8 = torch.zeros(100, 136, dtype=torch.uint8)  # any dtype: the row's raw bytes
    assert P.gather_limit(u8, 1000, repeats=1, dists=(0,))["row_bytes"] == 136


@pytest.mark.parametrize("bad", [lambda t: t.t(), lambda t: t[:, :3].contiguous(), lambda t: t.view(-1), lambda t: t[:0]])
def test_gather_limit_refuses_tables_it_cannot_read(bad):
    import torch

    with pytest.raises(ValueError):
        P.gather_limit(bad(torch.ones(64, 16, dtype=torch.uint8)), 100, repeats=1)


def test_gather_limit_over_several_tables():
    import numpy as np
    import torch

    tabs = [torch.ones(500 + 100 * t, 40, dtype=torch.float32) for t in range(3)]  # 160 B rows: 3 lines, a tail
    r = P.gather_limit(tabs, 3000, repeats=1, dists=(0, 4))
    assert r["tables"] == 3 and r["row_bytes"] == 160 and r["table_bytes"] == (500 + 600 + 700) * 160
    assert r["gbs"] > 0 and isinstance(r["per_line"], bool)
    read, rb, nrows = P.gather_reader(tabs)
    assert rb == 160 and nrows == [500, 600, 700]
    ids = np.concatenate([np.arange(n - 10, n, dtype=np.int64) for n in (500, 500, 500)])  # last rows of each
    for per_line in (False, True):
        read(ids, 4, per_line)
    with pytest.raises(ValueError, match="equal per-table segments"):
        read(ids[:-1], 0)
    with pytest.raises(ValueError, match="equal row bytes"):
        P.gather_reader([tabs[0], torch.ones(10, 16)])
    with pytest.raises(ValueError, match="at least one"):
        P.gather_reader([])


@pytest.mark.parametrize("row_bytes", [16, 64, 68, 136, 256, 400])
def test_gather_reader_reads_every_word_of_every_row(row_bytes):
    # the whole-row reader is unrolled per row size: its xor of 64 B loads must cover each row's
    # words exactly once, except the words its last (overlapping) load reads twice, which cancel
    import numpy as np
    import torch

    gen = np.random.default_rng(row_bytes)
    w = row_bytes // 4
    tabs = [torch.from_numpy(gen.integers(0, 2**32, (300 + 50 * t, w), dtype=np.uint64).astype(np.uint32).view(np.int32))
            for t in range(2)]
    ids = np.concatenate([gen.integers(0, 300, 200) for _ in tabs]).astype(np.int64)
    want = 0
    for t, tab in enumerate(tabs):
        rows = tab.numpy().view(np.uint32)[ids[t * 200:(t + 1) * 200]]
        if row_bytes > 64 and row_bytes % 64:
            rows = np.concatenate([rows[:, :(row_bytes // 64) * 16], rows[:, w - 16:]], axis=1)
        want ^= int(np.bitwise_xor.reduce(rows.ravel()))
    read, rb, _ = P.gather_reader(tabs)
    assert rb == row_bytes
    for dist in (0, 8, 64):
        assert read(ids, dist) == want


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_slice_reader_reads_exactly_the_ranges_it_is_given(threads):
    from sparsewise.advisor.probe import _segment_sum, slice_reader

    rng = np.random.default_rng(0)
    a = rng.standard_normal(64 * 100).astype(np.float32)
    b = rng.standard_normal(64 * 7).astype(np.float32)
    ranges = [(256 * 3, 256 * 10), (256 * 50, 256 * 51 + 100), (256 * 90, 256 * 100)]  # a cut row is left out
    read = slice_reader([(a, ranges), (b, [(0, b.nbytes)])], threads=threads)
    rows = a.reshape(-1, 64)
    want = rows[3:10].sum(dtype=np.float64) + rows[50:51].sum(dtype=np.float64) + rows[90:100].sum(dtype=np.float64)
    want += b.sum(dtype=np.float64)
    assert read() == pytest.approx(want, rel=1e-4, abs=1e-3)
    # the whole array in one range: the same as a plain sum, whatever the thread count
    seg = _segment_sum()
    assert seg(rows, np.array([0], np.int64), np.array([100], np.int64), threads) == pytest.approx(
        rows.sum(dtype=np.float64), rel=1e-4, abs=1e-3)


def test_slice_reader_refuses_a_copy():
    from sparsewise.advisor.probe import slice_reader

    a = np.ones((64, 128), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        slice_reader([(a, [(0, 256)])])
