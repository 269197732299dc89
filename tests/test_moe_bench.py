import argparse

import pytest

pytest.importorskip("transformers")


def _fake_probe(**_):
    return {"bandwidth": {"read_gbs_all": 30.0}, "gemm": {"fp32_gflops": 100.0, "bf16_gflops": 200.0},
            "machine": {"llc_bytes": 32 << 20}}


def test_bench_suite_runs_and_writes(tmp_path, monkeypatch):
    from sparsewise.advisor import probe
    from sparsewise.moe import bench

    monkeypatch.setattr(probe, "cached_probe", _fake_probe)
    tiny = {"tiny mixtral": dict(kind="mixtral", d=32, h=24, e=5, k=2, shared=0),
            "tiny deepseek": dict(kind="qwen2_moe", d=32, h=16, e=6, k=3, shared=2)}
    monkeypatch.setattr(bench, "WORKLOADS", tiny)
    monkeypatch.setattr(bench, "TOKENS", (1, 20))
    monkeypatch.setattr(bench, "measure", lambda pairs, progress=None, _m=bench.measure: _m(
        tiny, tokens=(1, 20), dtypes=("fp32",), pairs=1))
    path = bench.run(argparse.Namespace(threads=1, quick=True, out=str(tmp_path)))
    import json

    doc = json.loads(path.read_text())
    rows = doc["results"]
    assert len(rows) == 4 and {r["phase"] for r in rows} == {"decode", "prefill"}
    assert all(r["dense_ratio"] > 0 and r["sparse24_ratio"] > 0 for r in rows)
    # the % columns divide by the read bandwidth measured in the run, not the (fake) cached probe
    assert all(0.5 < r["read_gbs"] < 2000 and r["read_gbs"] != 30.0 for r in rows)
    # decode cells are also timed against a plain read of the bytes they reach; prefill cells are not
    for r in rows:
        decode = r["phase"] == "decode"
        for k in ("dense_pct_same_read", "sparse24_pct_same_read", "same_read_gbs_dense", "same_read_gbs_24"):
            assert (r[k] > 0) if decode else (r[k] is None)
    assert rows[0]["baseline_block"] == "MixtralSparseMoeBlock" and rows[-1]["baseline_block"] == "Qwen2MoeSparseMoeBlock"
    assert (tmp_path / "moe.md").read_text().startswith("| workload")
