import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsewise.moe import MoE, RouterConfig, build_plan, grouped_matvec, reference_moe
from sparsewise.moe import experts as experts_mod
from sparsewise.moe.kernels import activate, decode_swiglu, dp_available
from sparsewise.nm import NMTensor, is_nm, nm_mask

# awkward sizes: E not a power of two, k=3, dims not multiples of 16, experts left empty
CASES = [
    dict(d=36, h=20, e=5, k=3, t=1),
    dict(d=36, h=20, e=5, k=3, t=7),
    dict(d=64, h=44, e=6, k=2, t=13),
    dict(d=40, h=24, e=3, k=1, t=2),
]


def _naive(moe, x):
    p = moe.last_plan
    gu, dn = moe.experts.dense_weights()
    keep = torch.zeros(p.expert_ids.shape, dtype=torch.bool).reshape(-1)
    keep[p.slot] = True
    return reference_moe(x, p.expert_ids, p.weights, gu, dn, moe.config.activation, keep.reshape(p.expert_ids.shape))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{d}h{h}e{e}k{k}t{t}".format(**c))
@pytest.mark.parametrize("weights", ["dense", "2:4"])
def test_forward_matches_per_token_loop(case, weights):
    torch.manual_seed(0)
    moe = MoE(case["d"], case["h"], case["e"], case["k"], expert_weights=weights)
    x = torch.randn(case["t"], case["d"])
    with torch.no_grad():
        y = moe(x)  # inference: the streaming kernel path (dense) or the nm kernels (2:4)
        ref = _naive(moe, x)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)
    y2 = moe(x)  # autograd path: torch GEMMs per expert
    torch.testing.assert_close(y2.detach(), ref, atol=2e-5, rtol=1e-4)


def test_expert_with_no_tokens_and_many_rows():
    torch.manual_seed(0)
    moe = MoE(32, 16, 4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(80, 32).abs()
    with torch.no_grad():
        y = moe(x)
        assert moe.last_plan.counts_list == [0, 0, 80, 0]  # > DECODE_ROWS: the GEMM path
        torch.testing.assert_close(y, _naive(moe, x), atol=2e-5, rtol=1e-4)
        moe.set_prepack()  # oneDNN-prepacked GEMM
        torch.testing.assert_close(moe(x), _naive(moe, x), atol=2e-5, rtol=1e-4)
        x[:3, 0] = -1.0  # three tokens elsewhere: a mixed call, kernel for the small experts, GEMM for expert 2
        torch.testing.assert_close(moe(x), _naive(moe, x), atol=2e-5, rtol=1e-4)
        assert moe.last_plan.counts_list[2] == 77 and sum(moe.last_plan.counts_list) == 80
        moe.experts.gate_up.mul_(2)  # the prepacked copy follows in-place weight updates
        torch.testing.assert_close(moe(x), _naive(moe, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("weights", ["dense", "2:4"])
def test_gradients_match_per_token_loop(weights):
    torch.manual_seed(2)
    moe = MoE(36, 20, 5, 3, router=RouterConfig(5, 3, aux_loss_coef=0.01), expert_weights=weights,
              shared_experts=1)
    x = torch.randn(6, 36, requires_grad=True)
    y = moe(x)
    (y.square().sum() + moe.aux_loss()).backward()
    # the same function written as the naive loop, on leaf copies of every parameter
    x2 = x.detach().clone().requires_grad_()
    rw = moe.router.weight.detach().clone().requires_grad_()
    ex = moe.experts
    if weights == "dense":
        gu = ex.gate_up.detach().clone().requires_grad_()
        dn = ex.down.detach().clone().requires_grad_()
        gu_d, dn_d = gu, dn
    else:
        gu = ex.gate_up_values.detach().clone().requires_grad_()
        dn = ex.down_values.detach().clone().requires_grad_()
        gu_d = torch.stack([torch.zeros(p.shape).scatter(1, p.positions(), gu[e]) for e, p in enumerate(ex.packed[0])])
        dn_d = torch.stack([torch.zeros(p.shape).scatter(1, p.positions(), dn[e]) for e, p in enumerate(ex.packed[1])])
    sgu, sdn = (w.detach() for w in moe.shared.dense_weights())
    logits = x2 @ rw.T
    probs = torch.softmax(logits, -1)
    top, ids = probs.topk(3, -1)
    w = top / top.sum(-1, keepdim=True)
    ref = reference_moe(x2, ids, w, gu_d, dn_d) + reference_moe(x2, torch.zeros(6, 1, dtype=torch.long),
                                                                torch.ones(6, 1), sgu, sdn)
    from sparsewise.moe import load_balancing_loss

    (ref.square().sum() + load_balancing_loss(probs, ids, 5, 0.01)).backward()
    torch.testing.assert_close(y.detach(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(moe.router.weight.grad, rw.grad, atol=1e-4, rtol=1e-3)
    got_gu = ex.gate_up.grad if weights == "dense" else ex.gate_up_values.grad
    got_dn = ex.down.grad if weights == "dense" else ex.down_values.grad
    torch.testing.assert_close(got_gu, gu.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got_dn, dn.grad, atol=1e-4, rtol=1e-3)


def test_capacity_mode_output_skips_dropped_assignments():
    torch.manual_seed(3)
    moe = MoE(32, 24, 4, 2, capacity_factor=0.5)
    x = torch.randn(17, 32)
    with torch.no_grad():
        y = moe(x)
    plan = moe.last_plan
    assert plan.capacity == 5 and plan.dropped > 0 and 0 < plan.dropped_fraction < 1
    torch.testing.assert_close(y, _naive(moe, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("wide_from", [1, 4, 10**6])  # 2 weight rows per pass, mixed, 1 row per pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matvec_vs_reference(dtype, wide_from):
    torch.manual_seed(4)
    w = torch.randn(5, 37, 19).to(dtype)  # 37 rows: an odd last row in the 2-row passes
    x = torch.randn(17, 19)
    offsets = torch.tensor([0, 3, 3, 10, 10, 17])  # 3 and 7 rows: 4-row blocks plus leftovers
    y = grouped_matvec(w, x, offsets, [0, 2, 4], wide_from=wide_from)
    wf = w.to(torch.float32)
    want = torch.cat([x[0:3] @ wf[0].T, x[3:10] @ wf[2].T, x[10:17] @ wf[4].T])
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not dp_available(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("cols", [32, 96, 1056, 2816])
def test_grouped_matvec_bf16_dot_kernel(cols):
    # bf16 weights, C % 32 == 0: vdpbf16ps on x rounded to bf16. Experts with 0-17 rows cover
    # every pass width (1-8 tokens, with their accumulator chains), 8 + 1 and 8 + 8 + 1 passes;
    # 96 and 1056 columns leave 32-value blocks after the chains' round-robin, and 1056 / 2816
    # columns with 5 or more tokens are cut into input chunks whose sums add up in the output
    torch.manual_seed(cols)
    counts = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 17]
    w = torch.randn(len(counts), 37, cols).to(torch.bfloat16)
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), cols)
    used = [e for e, n in enumerate(counts) if n]
    y = grouped_matvec(w, x, offsets, used)
    xb, wf = x.to(torch.bfloat16).float(), w.float()
    want = torch.cat([xb[offsets[e]:offsets[e + 1]] @ wf[e].T for e in used])
    torch.testing.assert_close(y, want, atol=1e-4 * cols ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("cols", [16, 48, 1040, 2816])
def test_grouped_matvec_fp32_rows_kernel(cols):
    # fp32 weights, C % 16 == 0: the vdpbf16ps kernel's passes with 16-lane FMAs (experts with
    # up to F32_ROWS_MAX rows through grouped_matvec; called directly here for all). Experts with
    # 0-17 rows cover every pass width and 8 + 1, 8 + 8 + 1 passes; 48 and 1040 columns leave
    # 16-value blocks after the chains' round-robin; 1040 / 2816 columns with 2 or more tokens are
    # cut into input chunks; 37 rows leave a short last task whose read-ahead goes to the next task
    from sparsewise.moe.kernels import _compiled_rows, rows_kind

    torch.manual_seed(cols)
    counts = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 17]
    w = torch.randn(len(counts), 37, cols)
    assert rows_kind(w) == "f32" and rows_kind(w[..., 1:].contiguous()) == "widen"
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), cols)
    used = [e for e, n in enumerate(counts) if n]
    y = grouped_matvec(w, x, offsets, used)
    want = torch.cat([x[offsets[e]:offsets[e + 1]] @ w[e].T for e in used])
    torch.testing.assert_close(y, want, atol=1e-5 * cols ** 0.5, rtol=1e-5)
    direct = torch.empty_like(y)
    _compiled_rows("f32")(w.numpy(), x.numpy(), offsets.numpy(), np.asarray(used, dtype=np.int64), direct.numpy())
    torch.testing.assert_close(direct, want, atol=1e-5 * cols ** 0.5, rtol=1e-5)


def test_bf16_moe_close_to_fp32():
    torch.manual_seed(5)
    moe = MoE(64, 32, 6, 2)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = moe(x)
        moe.to(torch.bfloat16)
        y = moe(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_pruned_experts_pack_exactly():
    torch.manual_seed(6)
    moe = MoE(32, 16, 3, 2)
    with torch.no_grad():  # as the pruning workflow leaves them: 2:4 zeros in the dense weights
        for w in (moe.experts.gate_up, moe.experts.down):
            for e in range(3):
                w[e].mul_(nm_mask(w[e].abs(), 2, 4))
    x = torch.randn(9, 32)
    with torch.no_grad():
        dense = moe(x)
        moe.sparsify_()
        packed = moe(x)
    gu, dn = moe.experts.dense_weights()
    assert all(is_nm(gu[e], 2, 4) for e in range(3))
    assert moe.config.expert_weights == "2:4"
    assert isinstance(moe.experts.packed[0][0], NMTensor)
    torch.testing.assert_close(packed, dense, atol=2e-5, rtol=1e-4)
    assert moe.experts.weight_bytes() < 0.6 * 3 * (2 * 16 * 32 + 32 * 16) * 4


def test_state_dict_roundtrip_2_4():
    torch.manual_seed(7)
    a = MoE(32, 16, 3, 2, expert_weights="2:4")
    b = MoE(32, 16, 3, 2, expert_weights="2:4")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_bad_inputs():
    moe = MoE(32, 16, 4, 2)
    with pytest.raises(ValueError, match="d_model"):
        moe(torch.randn(3, 31))
    with pytest.raises(TypeError, match="bfloat16"):
        moe.experts(torch.randn(2, 32).to(torch.bfloat16), build_plan(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 4))
    with pytest.raises(ValueError, match="routes 2 tokens"):
        moe.experts(torch.randn(3, 32), build_plan(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 4))
    with pytest.raises(ValueError, match="top_k"):
        MoE(32, 16, 4, 5)
    with pytest.raises(ValueError, match="expert_weights"):
        MoE(32, 16, 4, 2, expert_weights="1:2")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(32, 16, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(32, 16, 4, 2, router=RouterConfig(5, 2))
    with pytest.raises(ValueError, match="not divisible"):
        MoE(30, 16, 4, 2, expert_weights="2:4")
    x = torch.randn(3, 32)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        moe(x)


def test_decode_rows_threshold_per_dtype():
    assert set(experts_mod.DECODE_ROWS) == {torch.float32, torch.bfloat16}
    assert max(experts_mod.DECODE_ROWS.values()) < 80  # test_expert_with_no_tokens_and_many_rows reaches the GEMM


@pytest.mark.parametrize("dtype,kernel", [(torch.float32, "perm"), (torch.bfloat16, "perm"), (torch.bfloat16, "dp")])
def test_grouped_nm_matmul_vs_reference(dtype, kernel):
    from sparsewise.moe.kernels import grouped_nm_matmul
    from sparsewise.nm.kernels import available_kernels

    torch.manual_seed(8)
    ws = [NMTensor.from_dense(torch.randn(70, 100).to(dtype)) for _ in range(5)]  # K=100: a scalar tail
    if kernel not in available_kernels(ws[0]):
        pytest.skip(f"{kernel} kernel not available on this CPU")
    vals, idx = torch.stack([w.values for w in ws]), torch.stack([w.indices for w in ws])
    offsets = torch.tensor([0, 3, 3, 4, 9, 11])  # expert 1 receives nothing, expert 2 a single row
    x = torch.randn(11, 100)
    y = grouped_nm_matmul(vals, idx, x, offsets, [0, 2, 3, 4], kernel)
    xr = x.to(torch.bfloat16).float() if kernel == "dp" else x
    want = torch.cat([xr[offsets[e]:offsets[e + 1]] @ ws[e].to_dense().float().T for e in (0, 2, 3, 4)])
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_kernels_refuse_inconsistent_groups():
    w = torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match="offsets"):
        grouped_matvec(w, torch.randn(1, 4), torch.tensor([0, 2, 2, 2]), [0])  # 2 rows routed, x has 1
    with pytest.raises(ValueError, match="offsets"):
        grouped_matvec(w, torch.randn(2, 4), torch.tensor([0, 2, 1, 2]), [0])
    with pytest.raises(ValueError, match="used experts"):
        grouped_matvec(w, torch.randn(2, 4), torch.tensor([0, 2, 2, 2]), [3])
    with pytest.raises(ValueError, match="columns"):
        grouped_matvec(w, torch.randn(2, 5), torch.tensor([0, 2, 2, 2]), [0])


@pytest.mark.parametrize("prepack,grouped_max", [(False, 10**9), (False, 1), (True, 10**9)])
def test_bf16_mixed_kernel_and_gemm_paths(prepack, grouped_max, monkeypatch):
    # bf16 inference: experts with few rows in the streaming kernel, the others in a grouped GEMM
    # (plain weights, up to GROUPED_MM_MAX_ROWS rows an expert), F.linear per expert (more rows)
    # or oneDNN on prepacked copies
    if prepack and not experts_mod.bf16_prepack_supported():
        pytest.skip("oneDNN's bf16 weight reorder needs avx512bw/vl/dq or avx_ne_convert")
    monkeypatch.setattr(experts_mod, "GROUPED_MM_MAX_ROWS", grouped_max)
    torch.manual_seed(9)
    moe = MoE(64, 48, 5, 2, dtype=torch.bfloat16).set_prepack(prepack)
    x = torch.randn(30, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = moe(x)
        counts = moe.last_plan.counts_list
        assert max(counts) > experts_mod.DECODE_ROWS[torch.bfloat16]
        ref = _naive(moe, x)
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.03)


def _steered(moe, many: int, few: int, dtype):
    """Router weights that send feature e's token to expert e: ``many`` tokens to experts 0 and 1,
    then ``few`` to experts 2 and 3 (x's other features are small noise)."""
    with torch.no_grad():
        moe.router.weight.zero_()
        for e in range(moe.config.num_experts):
            moe.router.weight[e, e] = 10.0  # feature e votes for expert e
    x = 0.01 * torch.randn(many + few, moe.config.d_model)
    x[:many, 0], x[:many, 1] = 1.0, 0.5
    x[many:, 2], x[many:, 3] = 1.0, 0.5
    return x.to(dtype)


@pytest.mark.skipif(not dp_available(), reason="needs AVX512_BF16")
def test_bf16_dp_threshold_mixes_kernel_and_grouped_gemm():
    # dims % 32 == 0: experts with up to DECODE_ROWS_DP rows take the vdpbf16ps kernel, the rest
    # one grouped GEMM; both kinds in one call
    torch.manual_seed(4)
    moe = MoE(64, 96, 4, 2, dtype=torch.bfloat16)
    x = _steered(moe, experts_mod.DECODE_ROWS_DP + 4, 3, torch.bfloat16)
    with torch.no_grad():
        y = moe(x)
        counts = moe.last_plan.counts_list
        limit = experts_mod.DECODE_ROWS_DP
        assert max(counts) > limit and 0 < min(c for c in counts if c) <= limit, counts
        ref = _naive(moe, x)
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.03)


@pytest.mark.skipif(not dp_available(), reason="needs AVX512_BF16")
@pytest.mark.parametrize("rows_min,gemm_min", [
    (1, 10**9),      # every expert in its own "dprows" calls
    (6, 10**9),      # the 4-row experts fused, the 9-row ones "dprows"
    (1, 6),          # 4-row experts "dprows", 9-row ones expanded
    (6, 6),          # 4-row fused, 9-row expanded
    (10**9, 10**9),  # all fused
    (None, 6),       # a CPU without "dprows": NM_GEMM_MIN_ROWS (6) expands the 9-row ones
])
def test_bf16_24_experts_mix_kernel_rows_and_expanded_gemm(rows_min, gemm_min, monkeypatch):
    # 2:4 bf16 inference: experts with at least NM_ROWS_MIN_ROWS rows leave the fused 2:4 kernel
    # for "dprows" calls of their own, and from NM_ROWS_GEMM_MIN_ROWS rows are expanded to dense
    # for torch's GEMM; every mix, odd dims (in_features 68 and 36: whole 64-input blocks plus a
    # tail), a shared expert (13 rows)
    if rows_min is None:
        monkeypatch.setattr(experts_mod.Experts, "_nm_rows_min", lambda self: None)
        monkeypatch.setattr(experts_mod, "NM_GEMM_MIN_ROWS", gemm_min)
    else:
        monkeypatch.setattr(experts_mod, "NM_ROWS_MIN_ROWS", (rows_min, rows_min))
        monkeypatch.setattr(experts_mod, "NM_ROWS_GEMM_MIN_ROWS", gemm_min)
    calls = []
    real = experts_mod.nm_matmul
    monkeypatch.setattr(experts_mod, "nm_matmul", lambda *a, **k: calls.append(k["kernel"]) or real(*a, **k))
    torch.manual_seed(5)
    moe = MoE(68, 36, 5, 2, expert_weights="2:4", shared_experts=1, dtype=torch.bfloat16)
    x = _steered(moe, 9, 4, torch.bfloat16)
    with torch.no_grad():
        y = moe(x)
        counts = moe.last_plan.counts_list
        assert sorted(counts) == [0, 4, 4, 9, 9]
        limit = gemm_min if rows_min is None else rows_min
        out = moe.experts._gemm_experts(moe.last_plan, moe.experts._nm_kernel())
        assert out == [e for e in moe.last_plan.used_experts() if counts[e] >= limit]
        rows = [counts[e] for e in out] + ([13] if 13 >= limit else [])  # the shared expert's too
        per_expert = sum(1 for c in rows if rows_min is not None and c < gemm_min)
        assert calls == ["dprows"] * (2 * per_expert)
        # the oracle's weights from torch's scatter, not from the expander under test
        def scattered(ex):
            return [torch.stack([t.scatter_dense() for t in ts]) for ts in ex.packed]

        p = moe.last_plan
        ref = reference_moe(x, p.expert_ids, p.weights, *scattered(moe.experts)) + reference_moe(
            x, torch.zeros(13, 1, dtype=torch.long), torch.ones(13, 1), *scattered(moe.shared))  # 13 rows
    assert moe.experts.weights_format == moe.shared.weights_format == "2:4"
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("weights,dtype", [("dense", torch.float32), ("dense", torch.bfloat16),
                                           ("2:4", torch.float32), ("2:4", torch.bfloat16)])
def test_inference_splits_kernel_and_gemm_experts(activation, weights, dtype, monkeypatch):
    # inference: the experts under the row thresholds in one compiled call (fused for SwiGLU,
    # grouped kernels for the others) on the plan restricted to them, the rest on torch's GEMM
    # adding their weighted rows into the same output; thresholds forced so both kinds occur
    for name in ("DECODE_ROWS", "DECODE_ROWS_PREPACKED"):
        monkeypatch.setattr(experts_mod, name, {torch.float32: 5, torch.bfloat16: 5})
    monkeypatch.setattr(experts_mod, "DECODE_ROWS_DP", 5)
    monkeypatch.setattr(experts_mod, "NM_GEMM_MIN_ROWS", 6)
    monkeypatch.setattr(experts_mod, "NM_ROWS_MIN_ROWS", (6, 6))
    torch.manual_seed(8)
    moe = MoE(68, 36, 5, 2, activation=activation, expert_weights=weights, dtype=dtype)
    x = _steered(moe, 10, 4, dtype)
    with torch.no_grad():
        y = moe(x)
        plan = moe.last_plan
        kernel = moe.experts._nm_kernel() if weights == "2:4" else None
        big = moe.experts._gemm_experts(plan, kernel)
        if weights == "dense" or kernel == "dp":
            assert big == [0, 1], plan.counts_list
        gu, dn = ((moe.experts.gate_up, moe.experts.down) if weights == "dense" else
                  [torch.stack([t.scatter_dense() for t in ts]) for ts in moe.experts.packed])
        ref = reference_moe(x, plan.expert_ids, plan.weights, gu, dn, activation)
    tol = 2e-5 if dtype == torch.float32 else 0.03
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------- fused dense decode (decode_swiglu)
def _unfused_decode(gu, dn, x, plan):
    used = plan.used_experts()
    xs = x.index_select(0, plan.token_index)
    h = grouped_matvec(gu, xs, plan.offsets, used)
    y = grouped_matvec(dn, activate(h, "swiglu"), plan.offsets, used)
    out = torch.zeros(x.shape[0], x.shape[1])
    return out.index_add(0, plan.token_index, y * plan.sorted_weights.unsqueeze(1))


@pytest.mark.parametrize("dtype,d,h", [(torch.float32, 36, 20), (torch.float32, 64, 44),
                                       (torch.bfloat16, 64, 96), (torch.bfloat16, 96, 160)])
def test_decode_swiglu_matches_the_unfused_steps(dtype, d, h):
    # bf16 with dims % 32 == 0 take the vdpbf16ps kernel (where the CPU has it) with the SwiGLU
    # rounded to bf16 in the fused call; fp32 the fp32 kernel; h % 16 != 0 leaves SwiGLU tail lanes
    torch.manual_seed(d + h)
    e, t, k = 7, 19, 3
    gu, dn = torch.randn(e, 2 * h, d).to(dtype), torch.randn(e, d, h).to(dtype)
    x = torch.randn(t, d).to(dtype)
    ids = torch.randint(0, e - 1, (t, k))  # expert e-1 receives nothing
    plan = build_plan(ids, torch.rand(t, k), e)
    got = decode_swiglu(gu, dn, x, plan.token_index, plan.sorted_weights, plan.offsets, plan.used_experts())
    want = _unfused_decode(gu, dn, x, plan)
    torch.testing.assert_close(got, want, atol=1e-3 * d ** 0.5, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5)


def test_fused_silu_matches_torch_including_non_finite():
    from sparsewise.moe.kernels import _compiled_decode

    g = torch.cat([torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 87.5, -87.5, 88.5, -88.5, -100.0, 100.0,
                                 3e38, -3e38, float("inf"), float("-inf"), float("nan")]),
                   torch.linspace(-120, 120, 24001), 10 * torch.randn(5000)]).float()
    h = torch.cat([g, torch.ones_like(g)]).reshape(1, -1)  # silu(g) * 1: a SwiGLU row
    got = torch.empty(1, g.shape[0])
    _compiled_decode("f32")["swiglu_rows"](h.numpy(), got.numpy())
    got = got.reshape(-1)
    want = torch.nn.functional.silu(g)
    torch.testing.assert_close(got, want, atol=1e-35, rtol=4e-7, equal_nan=True)


def test_decode_swiglu_rejects_a_broken_plan():
    gu, dn, x = torch.randn(3, 8, 4), torch.randn(3, 4, 4), torch.randn(2, 4)
    ti, wt = torch.tensor([0, 1]), torch.ones(2)
    with pytest.raises(ValueError, match="offsets"):
        decode_swiglu(gu, dn, x, ti, wt, torch.tensor([0, 2, 1, 2]), [0, 1])
    with pytest.raises(ValueError, match="offsets"):
        decode_swiglu(gu, dn, x, ti, wt, torch.tensor([0, 1, 1, 3]), [0, 2])
    with pytest.raises(ValueError, match="token_index"):
        decode_swiglu(gu, dn, x, torch.tensor([0, 2]), wt, torch.tensor([0, 1, 2, 2]), [0, 1])
    with pytest.raises(ValueError, match="used experts"):
        decode_swiglu(gu, dn, x, ti, wt, torch.tensor([0, 1, 2, 2]), [0, 3])
    with pytest.raises(ValueError, match="do not fit"):
        decode_swiglu(gu, torch.randn(3, 4, 5), x, ti, wt, torch.tensor([0, 1, 2, 2]), [0, 1])


@pytest.mark.parametrize("dtype,d,h", [(torch.float32, 36, 20), (torch.float32, 64, 48),
                                       (torch.bfloat16, 96, 40), (torch.bfloat16, 128, 192)])
def test_decode_swiglu_nm_matches_the_unfused_steps(dtype, d, h):
    # 2:4 experts: "perm" (fp32) or "dp" (bf16, AVX512_BF16) kernels; d=96 / h=40 leave inputs
    # after the last 64-wide block (all of them for h=40), which the kernels take in fp32
    from sparsewise.moe.kernels import decode_swiglu_nm, grouped_nm_matmul

    torch.manual_seed(d * h)
    e, t, k = 5, 11, 2
    ex = experts_mod.Experts(e, d, h, dtype=dtype).sparsify_()
    kernel = ex._nm_kernel()
    if kernel is None:
        pytest.skip("no AVX-512 2:4 kernel on this CPU")
    x = torch.randn(t, d).to(dtype)
    plan = build_plan(torch.randint(0, e - 1, (t, k)), torch.rand(t, k), e)
    used = plan.used_experts()
    got = decode_swiglu_nm(ex.gate_up_values, ex.gate_up_indices, ex.down_values, ex.down_indices, x,
                           plan.token_index, plan.sorted_weights, plan.offsets, used, kernel)
    xs = x.index_select(0, plan.token_index)
    hid = grouped_nm_matmul(ex.gate_up_values, ex.gate_up_indices, xs, plan.offsets, used, kernel)
    y = grouped_nm_matmul(ex.down_values, ex.down_indices, activate(hid, "swiglu"), plan.offsets, used, kernel)
    want = torch.zeros(t, d).index_add(0, plan.token_index, y * plan.sorted_weights.unsqueeze(1))
    torch.testing.assert_close(got, want, atol=2e-3 * d ** 0.5, rtol=2e-3 if dtype == torch.bfloat16 else 1e-5)
    with pytest.raises(ValueError, match="offsets"):
        decode_swiglu_nm(ex.gate_up_values, ex.gate_up_indices, ex.down_values, ex.down_indices, x,
                         plan.token_index, plan.sorted_weights, plan.offsets[:-1], used, kernel)


@pytest.mark.parametrize("weights", ["dense", "2:4"])
def test_fused_decode_with_large_intermediates(weights):
    # regression: the fused calls once took a raw address of their local (N, 2H) buffer, which
    # numba freed right after; above malloc's mmap threshold (12 MB here) that was a segfault
    from sparsewise.moe.kernels import decode_swiglu_nm

    torch.manual_seed(9)
    e, d, h, t = 2, 32, 512, 3000
    ex = experts_mod.Experts(e, d, h)
    if weights == "2:4":
        ex.sparsify_()
    x = torch.randn(t, d)
    plan = build_plan(torch.randint(0, e, (t, 1)), torch.rand(t, 1), e)
    with torch.no_grad():
        got = ex(x, plan) if weights == "dense" else decode_swiglu_nm(
            ex.gate_up_values, ex.gate_up_indices, ex.down_values, ex.down_indices, x, plan.token_index,
            plan.sorted_weights, plan.offsets, plan.used_experts(), ex._nm_kernel() or "perm")
        gu, dn = ex.dense_weights()
        got_fused = decode_swiglu(gu, dn, x, plan.token_index, plan.sorted_weights, plan.offsets, plan.used_experts())
    want = _unfused_decode(gu, dn, x, plan)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_fused, want, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=10), per=st.integers(1, 5),
       workers=st.integers(1, 4), c0=st.sampled_from([0.5, 2.0, 8.0]))
def test_task_bounds_split_every_task_once_by_work(counts, per, workers, c0):
    # the 2:4 grouped kernel's split of (expert, row chunk) tasks over threads: contiguous runs
    # that cover every task once, each within one task's cost of an equal share
    from sparsewise.moe.kernels import _task_bounds

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    used = np.array([e for e, c in enumerate(counts) if c > 0], np.int64)
    b = _task_bounds()(used, offsets, per, workers, c0)
    nt = used.shape[0] * per
    assert b.shape == (workers + 1,) and b[0] == 0 and b[-1] == nt and np.all(np.diff(b) >= 0)
    costs = np.repeat([c0 + counts[e] for e in used], per) if nt else np.zeros(0)
    share = costs.sum() / workers
    for w in range(workers):
        assert abs(costs[b[w]:b[w + 1]].sum() - share) <= costs.max(initial=0) + 1e-9


def test_bf16_prepack_says_when_the_cpu_cannot():
    # oneDNN's bf16 weight reorder needs avx512bw/vl/dq or avx_ne_convert: refuse at set time
    # with a clear error rather than fail in the first forward
    moe = MoE(64, 48, 5, 2, dtype=torch.bfloat16)
    if experts_mod.bf16_prepack_supported():
        assert moe.set_prepack(True).experts.prepack
    else:
        with pytest.raises(NotImplementedError, match="avx512bw"):
            moe.set_prepack(True)
    assert MoE(64, 48, 5, 2).set_prepack(True).experts.prepack  # fp32: always allowed
