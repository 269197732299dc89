"""prune_ / sparsegpt_prune_weight / wanda_scores: one-shot N:M pruning on tiny models.

Every model here is built inside the tests and is small enough that the whole file runs in a few
seconds on a CPU. Hand-computed Wanda masks (|W| * ||X_j||_2 from the inputs each layer really sees)
are used as the oracle for the calibration path: they pin down *which* activations each layer was
calibrated on, not only that the result is N:M.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import sparsewise.nm.prune as prune_mod
from sparsewise.nm.mask import is_nm, nm_mask
from sparsewise.nm.prune import (METHODS, PruneReport, prune_, skip_lm_head, sparsegpt_prune_weight,
                                 wanda_scores)

PATTERNS = [(2, 4), (1, 4), (4, 8)]


# ---------------------------------------------------------------- helpers

def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], names=None):
    after = model.state_dict()
    for k, v in before.items():
        if names is None or k.rsplit(".", 1)[0] in names:
            assert torch.equal(after[k], v), f"{k} was modified"


def nonzeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


def hand_wanda_mask(weight: torch.Tensor, inputs: list[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """Wanda N:M mask computed from scratch: score |W_ij| * sqrt(sum_t X_tj^2)."""
    k = weight.shape[1]
    sq = sum((x.detach().reshape(-1, k).double() ** 2).sum(0) for x in inputs)
    return nm_mask(weight.detach().abs().double() * sq.sqrt().unsqueeze(0), n, m)


def record_inputs(model: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    """Inputs every named Linear receives while ``run()`` executes."""
    seen = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: seen[name].append(args[0].detach().clone())) for name in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


class Mixed(nn.Module):
    """No layer stack. in_features 16 / 12 / 10 / 16: 'odd' (10) is never divisible by m,
    'fc2' (12) only by 4, 'head' is meant to be excluded by a filter_fn."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 10)
        self.odd = nn.Linear(10, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.odd(x))
        return self.head(x)


class KwBlock(nn.Module):
    """A residual MLP block that refuses to run without its keyword argument."""

    def __init__(self, d=16, f=32):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.seen_scales = []

    def forward(self, h, scale=None):
        if scale is None:
            raise RuntimeError("KwBlock needs the keyword argument 'scale'")
        self.seen_scales.append(float(scale))
        return h + self.fc2(torch.relu(self.fc1(h))) * scale


class KwStack(nn.Module):
    def __init__(self, d=16, nblocks=3):
        super().__init__()
        self.blocks = nn.ModuleList([KwBlock(d) for _ in range(nblocks)])

    def forward(self, x, scale):
        h = torch.tanh(x) * 3.0  # a non-Linear preprocessing step before the stack
        for blk in self.blocks:
            h = blk(h, scale=scale)
        return h


# ---------------------------------------------------------------- 1. every method / pattern

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_prune_every_method_and_pattern(method, n, m):
    torch.manual_seed(0)
    model = Mixed()
    before = snapshot(model)
    for k, v in before.items():
        assert (v != 0).all(), f"test setup: {k} must start with no zeros"
    calib = [torch.randn(4, 16) for _ in range(3)] if method != "magnitude" else None
    report = prune_(model, method, n, m, calibration=calib, filter_fn=lambda name, mod: name != "head",
                    progress=False)

    expected_pruned = {"fc1", "fc2"} if m == 4 else {"fc1"}
    expected_skipped = {"odd", "head"} | ({"fc2"} if m == 8 else set())
    assert isinstance(report, PruneReport)
    assert report.method == method and report.pattern == f"{n}:{m}"
    assert sorted(report.pruned) == sorted(expected_pruned)  # no duplicates, nothing extra
    assert set(report.skipped) == expected_skipped
    assert "filter" in report.skipped["head"]
    assert "divisible" in report.skipped["odd"] and str(m) in report.skipped["odd"]
    if m == 8:
        assert "divisible" in report.skipped["fc2"]

    for name in expected_pruned:
        lin = model.get_submodule(name)
        w, w0 = lin.weight.detach(), before[f"{name}.weight"]
        assert is_nm(w, n, m)
        assert (nonzeros_per_group(w, m) == n).all()
        assert torch.equal(lin.bias, before[f"{name}.bias"])  # only weights are pruned
        if method in ("magnitude", "wanda"):  # pure masking: kept weights keep their value
            assert torch.equal(w[w != 0], w0[w != 0])
        if method == "magnitude":
            assert torch.equal(w != 0, nm_mask(w0.abs(), n, m))
    # skipped layers are bit-identical
    assert_unchanged(model, before, names=expected_skipped)
    assert str(report).startswith(f"{method} {n}:{m}: pruned {len(expected_pruned)} layer(s)")


@pytest.mark.parametrize("method", METHODS)
def test_prune_stack_model_every_method(method):
    """The same guarantees on a model with a layer stack (block-by-block path)."""
    torch.manual_seed(1)
    model = KwStack(nblocks=2)
    calib = [(torch.randn(6, 16), 0.5) for _ in range(2)]
    report = prune_(model, method, 2, 4, calibration=calib if method != "magnitude" else None, progress=False)
    names = [f"blocks.{i}.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    assert sorted(report.pruned) == sorted(names)
    assert report.skipped == {}
    for name in names:
        w = model.get_submodule(name).weight
        assert is_nm(w, 2, 4) and (nonzeros_per_group(w, 4) == 2).all()


def test_default_filter_is_skip_lm_head():
    assert skip_lm_head("lm_head", nn.Linear(4, 4)) is False
    assert skip_lm_head("model.lm_head", nn.Linear(4, 4)) is False
    assert skip_lm_head("model.layers.0.mlp.up_proj", nn.Linear(4, 4)) is True
    assert skip_lm_head("lm_head_proj", nn.Linear(4, 4)) is True


# ---------------------------------------------------------------- 2. sparsegpt_prune_weight

def _layer_problem(seed=0, t=512, k=64, o=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    w = torch.randn(o, k, generator=g)
    return x.double(), w.double()


def _recon_err(x, w, wp):
    return float(((x @ wp.T - x @ w.T) ** 2).mean())


@pytest.mark.parametrize("n,m", PATTERNS)
def test_sparsegpt_beats_magnitude_and_wanda(n, m):
    x, w = _layer_problem()
    h = 2.0 * x.T @ x / x.shape[0]
    w_sgpt = sparsegpt_prune_weight(w, h, n, m)
    w_mag = w * nm_mask(w.abs(), n, m)
    w_wanda = w * nm_mask(wanda_scores(w, (x * x).sum(0)), n, m)
    assert w_sgpt.shape == w.shape and w_sgpt.dtype == w.dtype
    assert is_nm(w_sgpt, n, m) and (nonzeros_per_group(w_sgpt, m) == n).all()
    e_sgpt, e_mag, e_wanda = (_recon_err(x, w, v) for v in (w_sgpt, w_mag, w_wanda))
    assert e_sgpt < e_wanda and e_sgpt < e_mag, (e_sgpt, e_wanda, e_mag)
    assert e_sgpt < 0.8 * min(e_wanda, e_mag)  # clearly better, not a coin flip


def test_sparsegpt_on_a_real_linear_float32():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(512, 32) @ torch.randn(32, 32)
    h = 2.0 * x.double().T @ x.double() / x.shape[0]
    w0 = lin.weight.detach().clone()
    h0 = h.clone()
    wp = sparsegpt_prune_weight(lin.weight, h, 2, 4)
    assert wp.dtype == torch.float32 and torch.isfinite(wp).all()
    assert torch.equal(lin.weight, w0) and torch.equal(h, h0)  # inputs are not modified
    assert is_nm(wp, 2, 4)
    with torch.no_grad():
        ref, mag = lin(x), x @ (w0 * nm_mask(w0.abs(), 2, 4)).T + lin.bias
        out = x @ wp.T + lin.bias
    assert ((out - ref) ** 2).mean() < ((mag - ref) ** 2).mean()


def test_sparsegpt_blocksize_does_not_change_the_result():
    """Lazy block updates are an exact reorganisation of the column-by-column OBS updates."""
    x, w = _layer_problem(seed=3, k=48, o=8)
    h = 2.0 * x.T @ x / x.shape[0]
    ref = sparsegpt_prune_weight(w, h, 2, 4, blocksize=128)
    for bs in (4, 8, 16, 6):  # 6 is rounded to a multiple of m
        got = sparsegpt_prune_weight(w, h, 2, 4, blocksize=bs)
        assert torch.equal(got != 0, ref != 0), bs
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_sparsegpt_bad_hessian_shape():
    w = torch.randn(8, 16)
    for bad in (torch.eye(12), torch.eye(16)[:, :8], torch.ones(16)):
        with pytest.raises(ValueError, match="hessian"):
            sparsegpt_prune_weight(w, bad, 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_prune_weight(torch.randn(8, 10), torch.eye(10), 2, 4)
    with pytest.raises(ValueError):
        sparsegpt_prune_weight(w, torch.eye(16), 4, 4)


def test_sparsegpt_dead_inputs():
    x, w = _layer_problem(seed=5, k=32, o=16)
    dead = [3, 4, 17]
    x[:, dead] = 0.0
    h = 2.0 * x.T @ x / x.shape[0]
    wp = sparsegpt_prune_weight(w, h, 2, 4)
    assert torch.isfinite(wp).all()
    assert (wp[:, dead] == 0).all()
    assert is_nm(wp, 2, 4)
    live = [j for j in range(32) if j not in dead]
    assert (wp[:, live] != 0).any()
    # every input dead: no NaN, everything zero
    wz = sparsegpt_prune_weight(w, torch.zeros(32, 32, dtype=torch.float64), 2, 4)
    assert torch.isfinite(wz).all() and (wz == 0).all()


def test_prune_sparsegpt_with_a_dead_input_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    calib = []
    for _ in range(3):
        x = torch.randn(8, 16)
        x[:, 6] = 0.0
        calib.append(x)
    report = prune_(model, "sparsegpt", calibration=calib, progress=False)
    assert report.pruned == ["0", "2"]
    w = model[0].weight
    assert torch.isfinite(w).all() and (w[:, 6] == 0).all() and is_nm(w, 2, 4)
    assert torch.isfinite(model(calib[0])).all()


# ---------------------------------------------------------------- 3. wanda_scores

def test_wanda_scores_hand_computed():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # column sums of squares: 10, 4
    got = wanda_scores(w, (x * x).sum(0))
    r10 = math.sqrt(10.0)
    expected = torch.tensor([[r10, 4.0], [3.0 * r10, 8.0]])
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32


def test_wanda_scores_shape_and_mask_choice():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    sq = torch.tensor([0.0, 1.0, 16.0, 100.0])  # norms 0, 1, 4, 10 -> scores 0, 3, 8, 10
    s = wanda_scores(w.half(), sq)
    torch.testing.assert_close(s, torch.tensor([[0.0, 3.0, 8.0, 10.0]]))
    assert torch.equal(nm_mask(s, 2, 4), torch.tensor([[False, False, True, True]]))


# ---------------------------------------------------------------- 4. block-by-block calibration

def test_stack_passes_keyword_arguments_and_prunes():
    torch.manual_seed(0)
    model = KwStack(nblocks=2)
    with pytest.raises(RuntimeError, match="scale"):  # the block really needs its keyword
        model.blocks[0](torch.randn(2, 16))
    calib = [(torch.randn(5, 16), s) for s in (0.25, 0.75)]
    for method in ("wanda", "sparsegpt"):
        for blk in model.blocks:
            blk.seen_scales.clear()
        report = prune_(model, method, calibration=calib, progress=False)
        assert len(report.pruned) == 4
        for blk in model.blocks:
            assert blk.seen_scales, "block never ran"
            assert set(blk.seen_scales) == {0.25, 0.75}  # the right value, for every batch
            assert is_nm(blk.fc1.weight, 2, 4) and is_nm(blk.fc2.weight, 2, 4)


def test_stack_block_i_is_calibrated_on_pruned_outputs():
    """Wanda masks equal those computed by hand from the inputs each block receives once the
    blocks before it are pruned; inside a block, fc2 sees the output of the already-pruned fc1."""
    torch.manual_seed(0)
    model = KwStack(nblocks=3)
    dense = copy.deepcopy(model)
    calib = [(torch.randn(6, 16), s) for s in (0.5, 1.5)]
    prune_(model, "wanda", calibration=calib, progress=False)

    hs = [torch.tanh(x) * 3.0 for x, _ in calib]  # the stack's input per batch
    hs_dense = list(hs)
    differs = False
    with torch.no_grad():
        for i in range(3):
            blk, dblk = model.blocks[i], dense.blocks[i]
            fc2_in = [torch.relu(blk.fc1(h)) for h in hs]  # fc1 is pruned before fc2 is calibrated
            exp1 = hand_wanda_mask(dblk.fc1.weight, hs, 2, 4)
            exp2 = hand_wanda_mask(dblk.fc2.weight, fc2_in, 2, 4)
            assert torch.equal(blk.fc1.weight != 0, exp1), f"block {i} fc1"
            assert torch.equal(blk.fc2.weight != 0, exp2), f"block {i} fc2"
            # what a (wrong) calibration on the dense model's activations would have chosen
            differs |= not torch.equal(exp1, hand_wanda_mask(dblk.fc1.weight, hs_dense, 2, 4))
            hs = [blk(h, scale=s) for h, (_, s) in zip(hs, calib)]
            hs_dense = [dblk(h, scale=s) for h, (_, s) in zip(hs_dense, calib)]
    assert differs, "test setup: pruned and dense activations must lead to different masks"


def test_stack_calibration_spy_sees_pruned_block_outputs(monkeypatch):
    """The statistics for block 1 are gathered on exactly what pruned block 0 outputs."""
    torch.manual_seed(2)
    model = KwStack(nblocks=2)
    calib = [(torch.randn(4, 16), 1.0)]
    seen = {}
    orig = prune_mod._Stats.__call__

    def spy(self, module, args):
        seen.setdefault(id(module), []).append(args[0].detach().clone())
        return orig(self, module, args)

    monkeypatch.setattr(prune_mod._Stats, "__call__", spy)
    prune_(model, "sparsegpt", calibration=calib, progress=False)
    x, s = calib[0]
    with torch.no_grad():
        h1 = model.blocks[0](torch.tanh(x) * 3.0, scale=s)
    got = seen[id(model.blocks[1].fc1)]
    assert len(got) == 1
    torch.testing.assert_close(got[0], h1, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["hidden_states", "h"])
def test_stack_hidden_states_passed_by_keyword(key):
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, scale=None, **kw):
            assert scale is not None and list(kw) == [key]
            return torch.relu(self.fc(kw[key])) * scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Blk(), Blk()])

        def forward(self, x):
            for b in self.layers:
                x = b(scale=2.0, **{key: x})
            return x

    torch.manual_seed(0)
    model = Net()
    dense = copy.deepcopy(model)
    before = snapshot(model)
    calib = [torch.randn(6, 8)]
    try:
        report = prune_(model, "wanda", calibration=calib, progress=False)
    except Exception:
        assert_unchanged(model, before)  # at the very least, a failure must not half-prune the model
        raise
    assert report.pruned == ["layers.0.fc", "layers.1.fc"]
    with torch.no_grad():
        h1 = model.layers[0](scale=2.0, **{key: calib[0]})
    assert torch.equal(model.layers[1].fc.weight != 0, hand_wanda_mask(dense.layers[1].fc.weight, [h1], 2, 4))


@pytest.mark.parametrize("out_features", [4, 8])  # 4: loud RuntimeError; 8: silently wrong masks
def test_parallel_modulelist_is_not_a_layer_stack(out_features):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, out_features) for _ in range(3)])

        def forward(self, x):
            return torch.cat([h(x) for h in self.heads], -1)

    torch.manual_seed(0)
    model = Heads()
    dense = copy.deepcopy(model)
    before = snapshot(model)
    calib = [torch.randn(6, 8)]
    try:
        report = prune_(model, "wanda", calibration=calib, progress=False)
    except Exception:
        assert_unchanged(model, before)
        raise
    assert len(report.pruned) == 3
    for i in range(3):  # every head sees the model input
        assert torch.equal(model.heads[i].weight != 0, hand_wanda_mask(dense.heads[i].weight, calib, 2, 4))


# ---------------------------------------------------------------- 5. transformers Llama

def _tiny_llama(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _llama_calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, 16), generator=g) for _ in range(3)]


def test_llama_sparsegpt_default_filter_and_filter_none():
    model = _tiny_llama()
    projs = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
    calib = _llama_calib()
    head0 = model.lm_head.weight.detach().clone()
    report = prune_(model, "sparsegpt", calibration=calib, progress=False)
    assert sorted(report.pruned) == sorted(projs)
    assert report.skipped == {"lm_head": "excluded by filter_fn"}
    for name in projs:
        w = model.get_submodule(name).weight
        assert is_nm(w, 2, 4), name
        assert (nonzeros_per_group(w, 4) == 2).float().mean() > 0.99, name
    assert torch.equal(model.lm_head.weight, head0)
    assert not is_nm(model.lm_head.weight, 2, 4)
    with torch.no_grad():
        logits = model(calib[0]).logits
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()

    model2 = _tiny_llama()
    report2 = prune_(model2, "sparsegpt", calibration=calib, filter_fn=None, progress=False)
    assert sorted(report2.pruned) == sorted(projs + ["lm_head"])
    assert report2.skipped == {}
    assert is_nm(model2.lm_head.weight, 2, 4)
    with torch.no_grad():
        assert torch.isfinite(model2(calib[0]).logits).all()


def _llama_layer1_wanda_check(model):
    dense = copy.deepcopy(model)
    calib = _llama_calib()
    prune_(model, "wanda", calibration=calib, progress=False)
    names = [f"model.layers.1.{p}" for p in ("self_attn.q_proj", "mlp.gate_proj")]
    # layer 1's q_proj input depends only on pruned layer 0 (and norms), not on layer 1's Linears;
    # gate_proj is calibrated after layer 1's attention was pruned (stages run in forward order),
    # with its own MLP still dense
    seen_q = record_inputs(model, names[:1], lambda: [model(c, use_cache=False) for c in calib])
    exp_q = hand_wanda_mask(dense.get_submodule(names[0]).weight, seen_q[names[0]], 2, 4)
    assert torch.equal(model.get_submodule(names[0]).weight != 0, exp_q)
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    hybrid.model.layers[1].self_attn.load_state_dict(model.model.layers[1].self_attn.state_dict())
    seen_g = record_inputs(hybrid, names[1:], lambda: [hybrid(c, use_cache=False) for c in calib])
    exp_g = hand_wanda_mask(dense.get_submodule(names[1]).weight, seen_g[names[1]], 2, 4)
    assert torch.equal(model.get_submodule(names[1]).weight != 0, exp_g)


def test_llama_layer1_calibrated_on_pruned_layer0_without_cache():
    _llama_layer1_wanda_check(_tiny_llama(use_cache=False))


def test_llama_layer1_calibrated_on_pruned_layer0_default_config():
    _llama_layer1_wanda_check(_tiny_llama())


# ---------------------------------------------------------------- 6. calibration forms

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(8, 8)
        self.fb = nn.Linear(12, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, a, b):
        return self.out(torch.relu(self.fa(a) + self.fb(b)))


class KwOnly(TwoInputs):
    def forward(self, *, a, b):
        return super().forward(a, b)


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_calibration_forms(form):
    torch.manual_seed(0)
    model = KwOnly() if form == "dict" else TwoInputs()
    dense = copy.deepcopy(model)
    pairs = [(torch.randn(5, 8), torch.randn(5, 12) * (i + 1)) for i in range(3)]
    calib = {"tuple": lambda: [tuple(p) for p in pairs], "list": lambda: [list(p) for p in pairs],
             "dict": lambda: [{"a": a, "b": b} for a, b in pairs]}[form]()
    report = prune_(model, "wanda", calibration=iter(calib), progress=False)  # any iterable
    assert sorted(report.pruned) == ["fa", "fb", "out"]
    assert torch.equal(model.fa.weight != 0, hand_wanda_mask(dense.fa.weight, [a for a, _ in pairs], 2, 4))
    assert torch.equal(model.fb.weight != 0, hand_wanda_mask(dense.fb.weight, [b for _, b in pairs], 2, 4))
    with torch.no_grad():  # sequential: `out` is calibrated with fa and fb already pruned
        mid = [torch.relu(model.fa(a) + model.fb(b)) for a, b in pairs]
    assert torch.equal(model.out.weight != 0, hand_wanda_mask(dense.out.weight, mid, 2, 4))

    model2 = KwOnly() if form == "dict" else TwoInputs()
    prune_(model2, "sparsegpt", calibration=calib, progress=False)
    assert all(is_nm(model2.get_submodule(k).weight, 2, 4) for k in ("fa", "fb", "out"))


def test_layer_off_the_forward_path_is_skipped_with_reason():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Unused()
    w0 = model.unused.weight.detach().clone()
    report = prune_(model, "wanda", calibration=[torch.randn(4, 8)], progress=False)
    assert report.pruned == ["used"]
    assert "no calibration input" in report.skipped["unused"]
    assert torch.equal(model.unused.weight, w0)


# ---------------------------------------------------------------- 7. bad input

def test_bad_method_and_pattern():
    model = nn.Sequential(nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="method"):
        prune_(model, "random", progress=False)
    for n, m in ((3, 2), (0, 4), (4, 4), (-1, 4), (2, 32)):
        with pytest.raises(ValueError, match="N:M"):
            prune_(model, "magnitude", n, m, progress=False)
    with pytest.raises(TypeError):
        prune_(model, "magnitude", 2.0, 4, progress=False)
    assert_unchanged(model, before)


def test_non_module_model():
    for bad in (None, torch.randn(8, 8), [nn.Linear(8, 8)]):
        with pytest.raises(TypeError, match="nn.Module"):
            prune_(bad, "magnitude", progress=False)
        with pytest.raises(TypeError, match="nn.Module"):
            prune_(bad, "wanda", calibration=[torch.randn(2, 8)], progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_missing_or_empty_calibration(method):
    model = nn.Sequential(nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="calibration"):
        prune_(model, method, progress=False)
    with pytest.raises(ValueError, match="empty"):
        prune_(model, method, calibration=[], progress=False)
    with pytest.raises(ValueError, match="empty"):
        prune_(model, method, calibration=(x for x in []), progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_no_prunable_linear(method):
    calib = [torch.randn(2, 3, 8, 8)] if method != "magnitude" else None
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    before = snapshot(conv)
    with pytest.raises(ValueError, match="no prunable nn.Linear"):
        prune_(conv, method, calibration=calib, progress=False)
    assert_unchanged(conv, before)

    small = nn.Sequential(nn.Linear(10, 3))
    before = snapshot(small)
    calib = [torch.randn(4, 10)] if method != "magnitude" else None
    with pytest.raises(ValueError, match=r"no prunable nn.Linear.*in_features=10 is not divisible by m=4"):
        prune_(small, method, calibration=calib, progress=False)
    assert_unchanged(small, before)

    filtered = nn.Sequential(nn.Linear(8, 8))
    calib = [torch.randn(4, 8)] if method != "magnitude" else None
    with pytest.raises(ValueError, match="filter_fn"):
        prune_(filtered, method, calibration=calib, filter_fn=lambda name, mod: False, progress=False)


class TwoBlockStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["flat", "stack"])
@pytest.mark.parametrize("where", ["first", "later"])
def test_non_finite_calibration_loses_nothing(method, arch, where):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)) if arch == "flat" else TwoBlockStack()
    model.train()
    before = snapshot(model)
    calib = [torch.randn(4, 8) for _ in range(3)]
    bad = 0 if where == "first" else 2
    calib[bad][1, 3] = float("nan") if method == "wanda" else float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        prune_(model, method, calibration=calib, filter_fn=None, progress=False)
    assert_unchanged(model, before)
    assert model.training and all(mod.training for mod in model.modules())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_finite_activations_inside_the_model(method):
    """Finite inputs whose activations overflow inside the dense model (block 1's output)."""
    model = TwoBlockStack()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        model.blocks[1][0].weight.fill_(1e30)
    before = snapshot(model)
    calib = [torch.ones(2, 8) * 1e9]
    with pytest.raises(ValueError, match="NaN/Inf"):
        prune_(model, method, calibration=calib, progress=False)
    assert_unchanged(model, before)


def test_non_finite_after_pruning_loses_nothing():
    s = 2.0 ** 30
    model = TwoBlockStack()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # block 0: every row [3, -1, -1, -1]*s cancels exactly on an all-ones input; its 2:4 pruned
        # copy keeps (3s, -s) and outputs 2s
        model.blocks[0][0].weight.copy_(torch.tensor([3.0, -1.0, -1.0, -1.0]).repeat(8, 2) * s)
        model.blocks[1][0].weight.fill_(2.0 ** 100)  # 0 -> 0 dense; 2s -> 2^132 = inf once pruned
        model.blocks[2][0].weight.fill_(1.0)
        model.head.weight.fill_(1.0)
        x = torch.ones(1, 8)
        assert torch.isfinite(model(x)).all()  # the dense model is fine on this calibration
    before = snapshot(model)
    try:
        prune_(model, "wanda", calibration=[x], progress=False)
    except ValueError:
        assert_unchanged(model, before)  # refusing is fine, as long as nothing was changed
        return
    # prune_ may also succeed (e.g. by skipping what cannot be calibrated): then the result must be N:M
    assert all(is_nm(model.blocks[i][0].weight, 2, 4) for i in range(3))


# ---------------------------------------------------------------- 8. train / eval mode

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored(method, training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    model.train(training)
    calib = [torch.randn(32, 8)] if method != "magnitude" else None
    seen = []
    model[3].register_forward_pre_hook(lambda mod, args: seen.append(model[1].training))
    prune_(model, method, calibration=calib, progress=False)
    assert model.training is training
    assert all(mod.training is training for mod in model.modules())
    if method != "magnitude":
        assert seen and not any(seen), "calibration must run in eval mode (no dropout)"


def test_mixed_submodule_modes_are_restored():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    model.train()
    model[1].eval()
    modes = [mod.training for mod in model.modules()]
    prune_(model, "wanda", calibration=[torch.randn(4, 8)], progress=False)
    assert [mod.training for mod in model.modules()] == modes


def test_layers_fed_the_same_tensor_share_one_hessian_and_it_is_exact():
    from sparsewise.nm.prune import _gather

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 12)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x))

    torch.manual_seed(0)
    mod = Two()
    xs = [torch.randn(1, 5, 12) for _ in range(3)]
    layers = {"q": mod.q, "k": mod.k, "o": mod.o}
    stats = _gather(layers, "sparsegpt", lambda: [mod(x) for x in xs])
    flat = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    torch.testing.assert_close(stats["q"].h, flat.T @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["k"].h, stats["q"].h, rtol=0, atol=0)
    inner = torch.cat([(mod.q(x) * mod.k(x)).reshape(-1, 8) for x in xs]).double().detach()
    torch.testing.assert_close(stats["o"].h, inner.T @ inner, rtol=1e-5, atol=1e-5)
    assert stats["q"].rows == stats["o"].rows == 15


def test_llama_block_stages_follow_the_forward_order():
    from sparsewise.nm.prune import _linears, _stages, PruneReport

    model = _tiny_llama()
    block = model.model.layers[0]
    captured = []

    def grab(mod, args, kwargs):
        captured.append((args, kwargs))

    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(_llama_calib()[0], use_cache=False)
    h.remove()
    layers = _linears(block, "b", 2, 4, None, PruneReport("wanda", "2:4"))
    with torch.no_grad():
        groups, once = _stages(block, layers, captured[0])
    short = [[k.split(".")[-1] for k in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert once
