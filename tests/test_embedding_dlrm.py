"""DLRM, data sources, AUC, the train-dlrm command and the embedding bench on tiny sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsewise.cli import main
from sparsewise.embedding.data import CRITEO_KAGGLE_ROWS, movielens_100k, synthetic_criteo, zipf_ids
from sparsewise.embedding.dlrm import DLRM, TorchDLRM, auc, train


def test_auc_hand_cases():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5  # a tie counts half
    with pytest.raises(ValueError, match="both"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_zipf_ids_skew_and_range():
    gen = np.random.default_rng(0)
    ids = zipf_ids(100_000, 1000, 1.15, gen, perm=np.arange(1000))
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)
    assert counts[0] > 10 * counts[100]  # rank 1 is ~14x rank 101 at alpha 1.15
    assert zipf_ids(10, 5, 0.0, gen).max() < 5


def test_synthetic_criteo_shape_and_learnable_signal():
    d = synthetic_criteo(3000, scale=1e-4, seed=3)
    assert d.dense.shape == (3000, 13) and len(d.features) == 26
    assert [d.rows[f] for f in d.features] == [max(4, round(r * 1e-4)) for r in CRITEO_KAGGLE_ROWS]
    assert 0.1 < float(d.labels.mean()) < 0.6
    dense, kj, y = d.batch(10, 20)
    kj.validate()
    assert kj.batch_size == 10 and dense.shape == (10, 13) and y.shape == (10,)
    with pytest.raises(ValueError, match="scale"):
        synthetic_criteo(10, scale=0)


def test_subset_keeps_jagged_rows_aligned():
    d = synthetic_criteo(50, scale=1e-4, seed=1)
    d.lengths["C1"] = torch.arange(50) % 3  # make one feature jagged
    d.values["C1"] = torch.arange(int(d.lengths["C1"].sum()))
    sub = d.subset(torch.tensor([4, 0, 2]))
    off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(d.lengths["C1"], 0)])
    want = torch.cat([d.values["C1"][off[i]:off[i + 1]] for i in (4, 0, 2)])
    assert torch.equal(sub.values["C1"], want)
    assert torch.equal(sub.labels, d.labels[[4, 0, 2]])


def test_dlrm_matches_torch_dlrm_and_learns():
    tr = synthetic_criteo(6000, scale=1e-4, seed=0)
    te = synthetic_criteo(2000, scale=1e-4, seed=1)
    model = DLRM.for_data(tr, dim=8, lr=0.05)
    base = TorchDLRM.from_dlrm(model)
    dense, kj, _ = te.batch(0, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(dense, kj), base.eval()(dense, kj), rtol=1e-5, atol=1e-5)
    a = train(model, tr, te, epochs=1, batch_size=128)
    b = train(base, tr, te, epochs=1, batch_size=128)
    assert a.auc > 0.6  # the hidden model is learnable
    assert abs(a.auc - b.auc) < 0.005  # same model, same schedule: same quality
    assert a.samples_per_s > 0 and b.samples_per_s > 0


def test_dlrm_needs_one_dim():
    from sparsewise.embedding import EmbeddingBagCollection, TableConfig

    ebc = EmbeddingBagCollection([TableConfig("a", 5, 4), TableConfig("b", 5, 8)])
    with pytest.raises(ValueError, match="one embedding dim"):
        DLRM(3, ebc)


def test_cli_train_dlrm_synthetic(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["train-dlrm", "--data", "synthetic", "--samples", "4000", "--scale", "1e-4", "--epochs", "1",
               "--batch-size", "256", "--dim", "8", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "synthetic Criteo-like" in text and "test AUC" in text and "samples/s" in text and "AUC difference" in text
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"sparsewise", "torch"}


def test_cli_train_dlrm_bad_args(capsys):
    assert main(["train-dlrm", "--data", "nope"]) == 2
    assert main(["train-dlrm", "--data", "synthetic", "--lr", "-1", "--no-progress"]) == 1
    assert "--lr must be > 0" in capsys.readouterr().err


def test_movielens_loader_or_clear_error(tmp_path):
    try:
        tr, te = movielens_100k()
    except FileNotFoundError as exc:
        assert "make data" in str(exc)
        pytest.skip("recbole (MovieLens-100k) not installed: `make data`")
    assert len(tr) == 80_000 and len(te) == 20_000
    assert tr.rows["user"] == 943 and tr.rows["item"] == 1682
    assert 0.5 < float(tr.labels.mean()) < 0.6
    assert int(tr.lengths["genres"].max()) > 1  # a real multi-valued feature
    _, kj, _ = tr.batch(0, 100)
    kj.validate()


def test_movielens_corrupted_files(tmp_path):
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t2\n")
    (tmp_path / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    with pytest.raises(ValueError, match="line 2 has 2 fields"):
        movielens_100k(tmp_path)


def test_bench_rows_tiny(monkeypatch):
    from sparsewise.embedding import bench

    fake = {"bandwidth": {"read_gbs_all": 30.0}, "gather": {"row512": {"gbs": 12.0}}}
    monkeypatch.setattr("sparsewise.advisor.probe.cached_probe", lambda *a, **k: fake)
    rows = bench.forward_rows(T=2, N=5000, D=16, B=64, L=4, dists=("uniform", "zipf1.15"), dtypes=("fp32", "int8"), pairs=1)
    assert len(rows) == 12 and all(r["ratio"] > 0 and r["gbs"] > 0 for r in rows)
    assert {r["variant"] for r in rows} == {"kernel", "auto", "dedup"}
    assert {r["auto_picked"] for r in rows if r["variant"] == "auto"} <= {"kernel", "torch"}
    for r in rows:  # % of the gather limit (timed alongside) only where it means something
        if r["ids"] == "uniform" and r["variant"] == "kernel":
            assert r["pct_gather_limit"] > 0 and r["gather_limit_gbs"] > 0
        else:
            assert r["pct_gather_limit"] is None
        assert r["gather_limit_probe"]["row_bytes"] == r["row_bytes"]
    for r in rows:  # the line-rate ceiling goes with the uniform kernel rows, once fp32 is timed
        if r["ids"] == "uniform" and r["variant"] == "kernel":
            assert r["ceiling_ratio"] > 0 and r["lines_per_row"] == bench.lines_per_row(r["row_bytes"])
        else:
            assert r["ceiling_ratio"] is None
    trn = bench.training_rows(N=5000, D=16, B=64, L=4, pairs=1)
    assert {r["optimizer"] for r in trn} == {"RowwiseAdagrad", "Adagrad"}
    assert all(r["ceiling_ratio"] > 0 and r["floor_ms"] > 0 for r in trn)
    # the floor timed beside each step: ratio floor / step, times of that compare
    assert all(r["of_floor"] > 0 and r["floor_beside_ms"] > 0 and r["ours_beside_floor_ms"] > 0 for r in trn)
    dl = bench.dlrm_rows(batch_size=64, pairs=1)
    assert dl[0]["kind"] == "dlrm" and dl[0]["ratio"] > 0
    table = bench.format_table(rows + trn + dl)
    assert table.count("\n") == len(rows) + len(trn) + len(dl) + 1
    assert table.count("ms: ") == len(trn)  # each training row names its floor beside it


def test_lines_per_row():
    from sparsewise.embedding.bench import lines_per_row

    assert lines_per_row(512) == 8 and lines_per_row(256) == 4 and lines_per_row(64) == 1
    assert lines_per_row(136) == 3  # int8 rows of dim 128: 128 codes + scale + bias
    assert lines_per_row(4) == 1 and lines_per_row(72) == 2
    assert lines_per_row(100) == 2.5  # 100 B rows: as many span 3 lines as span 2, over 16 rows
    with pytest.raises(ValueError):
        lines_per_row(0)


def test_rmw_rows_touches_only_the_given_rows():
    import numpy as np

    from sparsewise.embedding.bench import rmw_rows

    tab = np.ones((50, 20), np.float32)
    rows = np.array([3, 7, 49], np.int64)
    rmw_rows()(tab, rows, 2)
    want = np.ones((50, 20), np.float32)
    want[rows] = np.float32(0.999) + np.float32(1e-3)
    np.testing.assert_allclose(tab, want, rtol=1e-6)
