"""EmbeddingBagCollection: kernels vs the pure-torch reference (forward values, fused backward +
optimizer over several steps), jagged edge cases, bad input, checkpoints."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sparsewise.embedding import (SGD, Adagrad, Adam, EmbeddingBagCollection, KeyedJagged, RowwiseAdagrad,
                                  TableConfig)
from sparsewise.embedding.functional import reference_step

OPTS = [SGD(lr=0.1), Adagrad(lr=0.1), RowwiseAdagrad(lr=0.1), Adam(lr=0.01)]


def _tables(pooling="sum", dims=(5, 7, 3)):
    return [TableConfig("a", 50, dims[0], ("x", "y"), pooling=pooling, init="normal", seed=1),
            TableConfig("b", 30, dims[1], ("z",), pooling="max" if pooling == "sum" else pooling, init="normal", seed=2),
            TableConfig("c", 1, dims[2], ("m",), pooling="mean", init="normal", seed=3)]


def _batch(rng, keys_rows, B, max_len=5, weighted=False, empty_p=0.3):
    bags = {}
    for k, n in keys_rows.items():
        bags[k] = [[] if rng.random() < empty_p else rng.integers(0, n, rng.integers(1, max_len + 1)).tolist()
                   for _ in range(B)]
    w = None
    if weighted:
        w = {k: [rng.uniform(-2, 2, len(b)).tolist() for b in v] for k, v in bags.items()}
    return KeyedJagged.from_lists(bags, weights=w)


KEYS_ROWS = {"x": 50, "y": 50, "z": 30, "m": 1}


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
def test_forward_matches_reference(pooling, weighted, dedup):
    rng = np.random.default_rng(0)
    ebc = EmbeddingBagCollection(_tables(pooling), dedup=dedup)
    for B in (1, 3, 17):
        kj = _batch(rng, KEYS_ROWS, B, weighted=weighted)
        out = ebc(kj)
        ref = ebc(kj, backend="reference")
        torch.testing.assert_close(out.values, ref.values, rtol=1e-5, atol=1e-6)
        assert out.values.shape == (B, 5 + 5 + 7 + 3)
        assert out.keys == ("x", "y", "z", "m")
        torch.testing.assert_close(out["z"], out.values[:, 10:17])


def test_key_order_of_batch_does_not_matter():
    rng = np.random.default_rng(1)
    ebc = EmbeddingBagCollection(_tables())
    kj = _batch(rng, KEYS_ROWS, 6)
    d = kj.to_dict()
    shuffled = KeyedJagged.from_dict({k: d[k] for k in ("m", "z", "x", "y")})
    torch.testing.assert_close(ebc(kj).values, ebc(shuffled).values)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_training_matches_reference_over_steps(opt, weighted):
    rng = np.random.default_rng(2)
    ebc = EmbeddingBagCollection(_tables(), optimizer=opt, dedup=weighted)  # both forward kernels feed backward
    _train_against_reference(ebc, opt, rng, [lambda: _batch(rng, KEYS_ROWS, 9, weighted=weighted)] * 4)
    assert int(ebc.step) == 4


def _train_against_reference(ebc, opt, rng, batches, rtol=1e-4):
    # one fused step per batch maker, each checked against reference_step: weights and state
    ws = [w.clone() for w in ebc.weights()]
    states = [{k: v.clone() for k, v in ebc.optimizer_state(t.name).items()} for t in ebc.tables]
    for step, make in enumerate(batches, start=1):
        kj = make()
        out = ebc(kj)
        g = torch.from_numpy(rng.standard_normal(out.values.shape).astype(np.float32))
        (out.values * g).sum().backward()
        reference_step(ebc.tables, ws, states, opt, kj, g, step)
        for t, cfg in enumerate(ebc.tables):
            torch.testing.assert_close(ebc.weights()[t], ws[t], rtol=rtol, atol=1e-5)
            for name, s in ebc.optimizer_state(cfg.name).items():
                torch.testing.assert_close(s, states[t][name], rtol=rtol, atol=1e-5)


def test_only_touched_rows_change_and_dense_params_untouched():
    ebc = EmbeddingBagCollection([TableConfig("t", 100, 4, init="normal")], optimizer=RowwiseAdagrad(lr=0.5))
    before = ebc.weights()[0].clone()
    kj = KeyedJagged.from_lists({"t": [[3, 3, 7], [], [7]]})
    ebc(kj).values.sum().backward()
    changed = (ebc.weights()[0] != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    assert list(ebc.parameters()) == []  # nothing for a dense torch optimizer to step twice


def test_no_update_in_eval_or_no_grad():
    ebc = EmbeddingBagCollection([TableConfig("t", 10, 4)], optimizer=SGD(lr=1.0))
    before = ebc.weights()[0].clone()
    kj = KeyedJagged.from_lists({"t": [[1, 2]]})
    with torch.no_grad():
        assert not ebc(kj).values.requires_grad
    ebc.eval()
    assert not ebc(kj).values.requires_grad
    torch.testing.assert_close(ebc.weights()[0], before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_jagged_batches(data):
    dim = data.draw(st.integers(1, 21), label="dim")
    rows = data.draw(st.integers(1, 40), label="rows")
    pooling = data.draw(st.sampled_from(["sum", "mean", "max"]))
    B = data.draw(st.integers(1, 6), label="B")
    shared = data.draw(st.booleans(), label="shared table")
    feats = ("f", "g") if shared else ("f",)
    lens = data.draw(st.lists(st.integers(0, 6), min_size=B * len(feats), max_size=B * len(feats)))
    same = data.draw(st.booleans(), label="all ids equal")
    ids = data.draw(st.lists(st.integers(0, rows - 1), min_size=sum(lens), max_size=sum(lens)))
    if same and ids:
        ids = [ids[0]] * len(ids)
    weighted = data.draw(st.booleans())
    w = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=len(ids), max_size=len(ids))), dtype=torch.float32) if weighted else None
    kj = KeyedJagged(feats, torch.tensor(ids, dtype=torch.int64), lengths=torch.tensor(lens), weights=w)
    opt = data.draw(st.sampled_from(OPTS))
    cfg = TableConfig("t", rows, dim, feats, pooling=pooling, init="normal")
    ebc = EmbeddingBagCollection([cfg], optimizer=opt, dedup=data.draw(st.booleans(), label="dedup"))
    with torch.no_grad():
        ref = ebc(kj, backend="reference").values
    ws = [ebc.weights()[0].clone()]
    states = [{k: v.clone() for k, v in ebc.optimizer_state("t").items()}]
    out = ebc(kj)
    torch.testing.assert_close(out.values.detach(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.values.shape)
    out.values.backward(g)
    reference_step([cfg], ws, states, opt, kj, g, 1)
    torch.testing.assert_close(ebc.weights()[0], ws[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- bad input

def _ebc(opt=None):
    return EmbeddingBagCollection([TableConfig("t", 10, 4, init="normal")], optimizer=opt)


@pytest.mark.parametrize("bad_id", [10, -1, 1 << 40])
def test_out_of_range_ids_refused_before_any_change(bad_id):
    ebc = _ebc(Adagrad(lr=1.0))
    before = ebc.weights()[0].clone()
    with pytest.raises(ValueError, match=rf"id {bad_id} at values\[2\].*10 rows"):
        ebc(KeyedJagged(["t"], torch.tensor([1, 2, bad_id]), lengths=torch.tensor([2, 1])))
    torch.testing.assert_close(ebc.weights()[0], before)


@pytest.mark.parametrize("pooling, dim, dtype", [("sum", 16, "fp32"), ("mean", 32, "bf16"), ("max", 16, "fp32"),
                                                  ("sum", 20, "int8")])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("mode", ["kernel", "auto", "dedup"])
def test_out_of_range_ids_found_by_the_gather_in_any_block(pooling, dim, dtype, train, mode):
    # the plain gather checks ids block by block (CHECK_BAGS bags) as it reads them: batches large
    # enough for the parallel kernel and several blocks a chunk, bad ids in a late block of the
    # second feature (whose table is smaller) and two bad ids: the first one is named
    from sparsewise.embedding import kernels as K

    B, L = 3000, 40  # 240k ids: parallel, past SERIAL_BYTES; 256-bag blocks
    tabs = [TableConfig("a", 5000, dim, ("f0",), pooling=pooling, init="normal"),
            TableConfig("b", 700, dim, ("f1",), pooling=pooling, init="normal", seed=1)]
    opt = Adagrad(lr=0.5) if train and pooling != "max" and dtype == "fp32" else None
    ebc = EmbeddingBagCollection(tabs, optimizer=opt, backend="auto" if mode == "auto" else "kernel",
                                 dedup=mode == "dedup")
    if dtype != "fp32":
        ebc = ebc.quantize(dtype)
    gen = torch.Generator().manual_seed(3)
    vals = torch.cat([torch.randint(0, 5000, (B * L,), generator=gen), torch.randint(0, 700, (B * L,), generator=gen)])
    kj = KeyedJagged(["f0", "f1"], vals, lengths=torch.full((2 * B,), L))
    good = ebc(kj).values.detach().clone()
    first = B * L + (K.CHECK_BAGS * 5 + 7) * L + 3  # feature f1, late in its bags
    vals2 = vals.clone()
    vals2[first] = 700
    vals2[first + 4 * K.CHECK_BAGS * L] = -2
    before = [w.clone() for w in ebc.weights()]
    with pytest.raises(ValueError, match=rf"id 700 at values\[{first}\] \(feature 'f1'\).*700 rows"):
        out = ebc(KeyedJagged(["f0", "f1"], vals2, lengths=torch.full((2 * B,), L)))
        if opt is not None:
            out.values.sum().backward()
    for w, b in zip(ebc.weights(), before):
        assert torch.equal(w, b)
    torch.testing.assert_close(ebc(kj).values.detach(), good)  # and it still works


@pytest.mark.parametrize("kj, match", [
    (KeyedJagged(["t"], torch.tensor([1.0, 2.0]), lengths=torch.tensor([2])), "int64 or int32"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), lengths=torch.tensor([3])), "sum to 3 but there are 2"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), offsets=torch.tensor([0, 2, 1, 2])), "not monotone"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), offsets=torch.tensor([1, 2])), r"offsets\[0\] must be 0"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), offsets=torch.tensor([0, 1])), r"offsets\[-1\] = 1"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), lengths=torch.tensor([-1, 3])), "negative"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), lengths=torch.tensor([2]), weights=torch.tensor([1.0])), "shape"),
    (KeyedJagged(["t"], torch.tensor([1, 2]), lengths=torch.tensor([2]), weights=torch.tensor([1.0, float("nan")])), "not finite"),
    (KeyedJagged(["u"], torch.tensor([1, 2]), lengths=torch.tensor([2])), "unknown"),
    (KeyedJagged(["t", "t"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1])), "duplicate"),
])
def test_bad_batches(kj, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _ebc()(kj)


def test_nan_gradient_refused_and_nothing_changes():
    ebc = _ebc(Adam(lr=0.1))
    before = ebc.weights()[0].clone()
    states = {k: v.clone() for k, v in ebc.optimizer_state("t").items()}
    out = ebc(KeyedJagged.from_lists({"t": [[1, 2], [3]]}))
    g = torch.ones_like(out.values)
    g[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        out.values.backward(g)
    torch.testing.assert_close(ebc.weights()[0], before)
    for k, v in ebc.optimizer_state("t").items():
        torch.testing.assert_close(v, states[k])
    assert int(ebc.step) == 0


def test_bad_configs():
    with pytest.raises(ValueError, match="pooling"):
        TableConfig("t", 10, 4, pooling="avg")
    with pytest.raises(ValueError, match="num_rows"):
        TableConfig("t", 0, 4)
    with pytest.raises(ValueError, match="dtype"):
        TableConfig("t", 10, 4, dtype="int4")
    with pytest.raises(ValueError, match="listed by tables"):
        EmbeddingBagCollection([TableConfig("a", 10, 4, ("f",)), TableConfig("b", 10, 4, ("f",))])
    with pytest.raises(TypeError, match="cannot be fused"):
        EmbeddingBagCollection([TableConfig("a", 10, 4)], optimizer=torch.optim.SGD)
    with pytest.raises(NotImplementedError, match="fp32 tables only"):
        EmbeddingBagCollection([TableConfig("a", 10, 4, dtype="int8")], optimizer=SGD())
    with pytest.raises(ValueError, match="lr"):
        Adagrad(lr=-1)
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.5))


def test_table_moved_by_to_is_refused():
    ebc = _ebc()
    ebc.to(torch.float64)
    with pytest.raises(ValueError, match="did something call .to"):
        ebc(KeyedJagged.from_lists({"t": [[1]]}))


# ---------------------------------------------------------------------- state and checkpoints

def test_state_dict_round_trip_keeps_training_identical(tmp_path):
    rng = np.random.default_rng(3)
    a = EmbeddingBagCollection(_tables(), optimizer=Adam(lr=0.05))
    for _ in range(2):
        kj = _batch(rng, KEYS_ROWS, 5)
        a(kj).values.square().sum().backward()
    b = EmbeddingBagCollection(_tables(), optimizer=Adam(lr=0.05))
    b.load_state_dict(a.state_dict())
    path = a.save(tmp_path / "emb.safetensors")
    c = EmbeddingBagCollection.load(path)
    kj = _batch(rng, KEYS_ROWS, 5)
    for m in (a, b, c):
        m(kj).values.square().sum().backward()
    for m in (b, c):
        assert int(m.step) == int(a.step) == 3
        for wa, wm in zip(a.weights(), m.weights()):
            torch.testing.assert_close(wa, wm, rtol=0, atol=0)


def test_corrupted_and_foreign_checkpoints(tmp_path):
    a = _ebc(SGD())
    path = a.save(tmp_path / "e.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        EmbeddingBagCollection.load(tmp_path / "trunc.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sparsewise embedding checkpoint"):
        EmbeddingBagCollection.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------- kernel choice

@pytest.mark.parametrize("pooling, weighted", [("sum", True), ("sum", False), ("mean", False), ("max", False)])
def test_torch_backend_matches_reference(pooling, weighted):
    rng = np.random.default_rng(7)
    cfgs = [TableConfig("a", 40, 12, ("x", "y"), pooling=pooling, init="normal"), TableConfig("b", 9, 4, ("z",), pooling=pooling)]
    ebc = EmbeddingBagCollection(cfgs, backend="torch").eval()
    kj = _batch(rng, {"x": 40, "y": 40, "z": 9}, 7, weighted=weighted)
    torch.testing.assert_close(ebc(kj).values, ebc(kj, backend="reference").values, rtol=1e-5, atol=1e-5)
    q = ebc.quantize("int8") if pooling == "sum" else None
    if q is not None:
        torch.testing.assert_close(q(kj).values, q(kj, backend="reference").values, rtol=1e-5, atol=1e-5)


def test_torch_backend_refused_where_it_would_differ():
    ebc = EmbeddingBagCollection([TableConfig("a", 10, 4, ("x",), pooling="mean")], backend="torch").quantize("bf16")
    with pytest.raises(ValueError, match="backend='torch' needs"):
        ebc(KeyedJagged.from_lists({"x": [[1]]}))
    with pytest.raises(ValueError, match="backend must be"):
        EmbeddingBagCollection([TableConfig("a", 10, 4)], backend="fast")


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: type(o).__name__)
def test_training_through_torch_forward_matches_reference(opt):
    rng = np.random.default_rng(8)
    cfgs = [TableConfig("a", 30, 6, ("x", "y"), init="normal"), TableConfig("c", 5, 3, ("m",), pooling="mean", init="normal")]
    ebc = EmbeddingBagCollection(cfgs, optimizer=opt, backend="torch")
    ws = [w.clone() for w in ebc.weights()]
    states = [{k: v.clone() for k, v in ebc.optimizer_state(t.name).items()} for t in ebc.tables]
    for step in range(1, 4):
        kj = _batch(rng, {"x": 30, "y": 30, "m": 5}, 6)
        out = ebc(kj)
        g = torch.from_numpy(rng.standard_normal(out.values.shape).astype(np.float32))
        out.values.backward(g)
        reference_step(ebc.tables, ws, states, opt, kj, g, step)
    for t in range(2):
        torch.testing.assert_close(ebc.weights()[t], ws[t], rtol=1e-4, atol=1e-5)


def test_kernel_chooser_alternates_then_keeps_the_faster():
    from sparsewise.embedding.functional import KernelChooser

    ch = KernelChooser(trials=2, recheck=3)
    seen = []
    for _ in range(4):
        k = ch.choose("b")
        seen.append(k)
        ch.record("b", k, 1.0 if k == "kernel" else 2.0)
    assert sorted(seen) == ["kernel", "kernel", "torch", "torch"]
    assert ch.decisions() == {"b": "kernel"}
    assert [ch.choose("b") for _ in range(3)] == ["kernel"] * 3
    assert ch.decisions() == {"b": "kernel"}
    ch.choose("b")  # the 4th call after deciding starts timing both again
    assert ch.decisions() == {"b": None}


@pytest.mark.parametrize("dim", [16, 48, 128, 160, 272])
@pytest.mark.parametrize("pooling, weighted", [("sum", False), ("sum", True), ("mean", True)])
def test_register_accumulated_fp32_path(dim, pooling, weighted):
    # dims that are multiples of 16 take the vector-register bag loop (in blocks of up to 128)
    rng = np.random.default_rng(dim)
    cfgs = [TableConfig("a", 300, dim, ("x", "y"), pooling=pooling, init="normal"),
            TableConfig("b", 20, 5, ("z",), init="normal")]  # and a generic-path table in the same call
    ebc = EmbeddingBagCollection(cfgs, backend="kernel", prefetch=3).eval()
    kj = _batch(rng, {"x": 300, "y": 300, "z": 20}, 13, max_len=9, weighted=weighted)
    torch.testing.assert_close(ebc(kj).values, ebc(kj, backend="reference").values, rtol=1e-5, atol=1e-5)
    for dtype in ("bf16", "fp16", "int8"):  # each storage type has its own register loop
        q = ebc.quantize(dtype)
        torch.testing.assert_close(q(kj).values, q(kj, backend="reference").values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [32, 128, 160])
def test_bf16_bags_with_inf_and_nan_match_reference(dim):
    # unweighted bf16 bags sum with vdpbf16ps against (1, 0) / (0, 1) pairs where the CPU has it:
    # an inf in one half of a 32-bit word makes NaN (inf * 0) in the other half's sum, so such bags
    # are pooled again the exact way; sums must match the reference, inf and NaN included
    rng = np.random.default_rng(dim)
    ebc = EmbeddingBagCollection([TableConfig("a", 50, dim, ("x",), init="normal")], backend="kernel").quantize("bf16")
    w = ebc.embedding_tables["a"].weight
    with torch.no_grad():
        w[3, 1] = float("inf")  # odd column: the high half of word 0
        w[4, 2] = float("-inf")  # even column: the low half of word 1
        w[5, dim - 1] = float("nan")
    bags = [rng.integers(0, 50, rng.integers(0, 7)).tolist() for _ in range(40)] + [[3], [4], [5], [3, 4], [3, 0]]
    kj = KeyedJagged.from_lists({"x": bags})
    got, want = ebc(kj).values, ebc(kj, backend="reference").values
    assert not torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: type(o).__name__)
def test_register_fused_update_matches_reference(opt):
    # dims % 16 == 0 up to 128 update in vector registers (sum and mean features, shared tables,
    # per-id weights); 160 and 5 take the generic path in the same call
    rng = np.random.default_rng(7)
    cfgs = [TableConfig("a", 60, 16, ("x", "y"), pooling="mean", init="normal"),
            TableConfig("b", 40, 128, ("z",), init="normal"),
            TableConfig("c", 30, 48, ("u",), init="normal"),
            TableConfig("d", 20, 160, ("v",), init="normal"),
            TableConfig("e", 10, 5, ("w",), pooling="mean", init="normal")]
    rows = {"x": 60, "y": 60, "z": 40, "u": 30, "v": 20, "w": 10}
    ebc = EmbeddingBagCollection(cfgs, optimizer=opt, backend="kernel")
    _train_against_reference(ebc, opt, rng, [lambda w=w: _batch(rng, rows, 11, max_len=7, weighted=w)
                                             for w in (True, False, True)])


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: type(o).__name__)
def test_parallel_update_with_runs_longer_than_a_chunk(opt):
    # a batch large enough for the multithreaded update, over so few rows that every run of equal
    # ids crosses several of its chunk boundaries (each run must be applied exactly once)
    rng = np.random.default_rng(11)
    cfgs = [TableConfig("a", 3, 128, ("x",), init="normal"), TableConfig("b", 2, 5, ("y",), init="normal")]
    ebc = EmbeddingBagCollection(cfgs, optimizer=opt, backend="kernel")
    # runs of ~900 gradients summed in another order than the reference's: rtol 1e-3 (a run
    # applied twice or skipped is off by a factor, not by rounding)
    _train_against_reference(ebc, opt, rng, [lambda: _batch(rng, {"x": 3, "y": 2}, 600, max_len=12)] * 2, rtol=1e-3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sort_by_row_serial_and_parallel_match_a_stable_sort(data):
    from sparsewise.embedding import kernels as K

    nfeat = data.draw(st.integers(1, 3), label="features")
    B = data.draw(st.integers(1, 700), label="B")
    rows = data.draw(st.lists(st.integers(1, 5000), min_size=nfeat, max_size=nfeat), label="rows per table")
    seed = data.draw(st.integers(0, 2 ** 31), label="seed")
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 40, nfeat * B)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    feat_table = np.arange(nfeat, dtype=np.int64)
    tab_base = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    values = np.concatenate([rng.integers(0, rows[i // B], lens[i]) for i in range(nfeat * B)] + [np.zeros(0, np.int64)])
    values = values.astype(np.int64)
    gkey = tab_base[np.repeat(np.arange(nfeat * B) // B, lens)] + values
    order = np.argsort(gkey, kind="stable")
    bag = np.repeat(np.arange(nfeat * B), lens)
    # parallel and serial kernels; need_pos False packs key and bag in one word, positions not kept
    for kern, need_pos in itertools.product(K._compiled()["sort_by_row"], (True, False)):
        key, tag = kern(values, offsets, B, feat_table, tab_base, int(sum(rows)), need_pos)
        np.testing.assert_array_equal(key, gkey[order])
        np.testing.assert_array_equal(tag & 0xFFFFFFFF, order if need_pos else 0)
        np.testing.assert_array_equal(tag >> 32, bag[order])
