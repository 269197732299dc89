import json

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
        # a random gather cannot beat streaming by much
        assert g["gbs"] < 3 * bw["read_gbs_all"]
    assert doc["gemm"]["fp32_gflops"] > 1 and doc["gemm"]["bf16_gflops"] > 0.1
    assert 0.1 < doc["gemv"]["fp32_gbs"] < 2000


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
