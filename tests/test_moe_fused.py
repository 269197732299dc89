"""MoE's one-call decode (router + routing + routed and shared experts in one compiled call)
against the step-by-step inference path it replaces, and where it must step aside."""
import pytest
import torch
import torch.nn as nn

from sparsewise.moe import MoE, RouterConfig

D, H = 64, 32  # multiples of 32: bf16 takes the vdpbf16ps kernels where the CPU has them


def _steps(m: MoE, x: torch.Tensor):
    # the same forward with the one-call decode switched off
    m._fused_decode = lambda x2: None
    try:
        return m(x), m.last_plan
    finally:
        del m._fused_decode


def _build(dtype, weights, router, shared, gate, seed=0):
    torch.manual_seed(seed)
    m = MoE(D, H, 6, 3, router=router, shared_experts=shared, shared_expert_gate=gate, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
        if m.router.expert_bias is not None:
            m.router.expert_bias.copy_(torch.randn(6) * 0.05)
    if weights == "2:4":
        m.sparsify_()
    return m


ROUTERS = {
    "softmax": RouterConfig(6, 3),
    "sigmoid-groups": RouterConfig(6, 3, scoring="sigmoid", expert_bias=True, n_group=3, topk_group=2,
                                   routed_scaling_factor=2.5),
    "softmax-unnormalised": RouterConfig(6, 3, norm_topk_prob=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", ["dense", "2:4"])
@pytest.mark.parametrize("router,shared,gate", [("softmax", 0, False), ("sigmoid-groups", 2, False),
                                                ("softmax-unnormalised", 1, True)])
@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_one_call_decode_matches_the_steps(dtype, weights, router, shared, gate, tokens):
    m = _build(dtype, weights, ROUTERS[router], shared, gate)
    x = torch.randn(tokens, D).to(dtype)
    with torch.inference_mode():
        # the one-call path applies here, unless an expert may get more rows than this host's
        # kernel takes (bf16 without AVX512_BF16: the fp32 decode kernel's smaller limit)
        if tokens <= m.experts.fused_args()[2]:
            assert m._fused_decode(x) is not None
        y = m(x.unsqueeze(0))
        plan = m.last_plan
        y0, plan0 = _steps(m, x.unsqueeze(0))
    assert y.shape == (1, tokens, D) and y.dtype == dtype
    for f in ("expert_ids", "token_index", "slot", "counts", "offsets"):
        assert torch.equal(getattr(plan, f), getattr(plan0, f)), f
    assert plan.counts_list == plan0.counts_list
    torch.testing.assert_close(plan.weights, plan0.weights, rtol=1e-5, atol=1e-6)
    # bf16: the steps round the routed sum (and the shared part) to bf16 before adding them
    tol = dict(rtol=2e-2, atol=2e-2 * float(y0.float().abs().max())) if dtype == torch.bfloat16 else \
        dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.float(), y0.float(), **tol)


def test_nan_input_is_a_clear_error():
    m = _build(torch.float32, "dense", ROUTERS["softmax"], 0, False)
    x = torch.randn(2, D)
    x[1, 5] = float("nan")
    with torch.inference_mode(), pytest.raises(ValueError, match="NaN or Inf"):
        m(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changed_weights_are_seen(dtype):
    m = _build(dtype, "dense", ROUTERS["softmax"], 1, True)
    x = torch.randn(3, D).to(dtype)
    with torch.inference_mode():
        m(x)  # fills the caches
    # in place through .data (no version bump), and replaced outright
    m.router.weight.data.mul_(-1.5)
    m.shared_gate.weight.data.add_(0.7)
    m.experts.down.data.mul_(2.0)
    m.experts.gate_up = nn.Parameter(torch.randn_like(m.experts.gate_up) * 0.3)
    with torch.inference_mode():
        y = m(x)
        y0, _ = _steps(m, x)
    torch.testing.assert_close(y.float(), y0.float(), rtol=2e-2, atol=2e-2 * float(y0.float().abs().max()))


def test_mixed_router_dtype_is_rounded_like_the_steps():
    # an fp32 router on a bf16 block: the steps compute logits in x's dtype
    m = _build(torch.bfloat16, "dense", ROUTERS["softmax"], 0, False)
    m.router.float()
    x = torch.randn(4, D).to(torch.bfloat16)
    with torch.inference_mode():
        m(x)
        plan = m.last_plan
        _, plan0 = _steps(m, x)
    assert torch.equal(plan.expert_ids, plan0.expert_ids)


def test_steps_aside_for_hooks_training_capacity_and_prefill():
    m = _build(torch.float32, "dense", ROUTERS["softmax"], 1, False)
    x = torch.randn(2, D)
    seen = []
    h = m.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.inference_mode():
        m(x)
    h.remove()
    assert seen == [(2, D)]  # the hook saw the experts' call
    assert m._fused_decode(x) is None  # parameters want gradients and grad mode is on
    with torch.no_grad():
        assert m._fused_decode(x) is not None
        assert m._fused_decode(torch.randn(500, D)) is None  # GEMM-sized expert groups
    capped = MoE(D, H, 6, 3, capacity_factor=1.0)
    aux = MoE(D, H, 6, 3, router=RouterConfig(6, 3, aux_loss_coef=0.01))
    with torch.no_grad():
        assert capped._fused_decode(x) is None and aux._fused_decode(x) is None


def test_one_call_decode_works_in_training_mode_with_expert_bias():
    # inference forward of a router in training mode still records the counts for update_bias
    m = _build(torch.float32, "dense", ROUTERS["sigmoid-groups"], 0, False)
    x = torch.randn(5, D)
    with torch.no_grad():
        m(x)
        counts = m.router._last_counts.clone()
        before = m.router.expert_bias.clone()
        m.router.update_bias()
    assert int(counts.sum()) == 5 * 3
    assert not torch.equal(before, m.router.expert_bias)


@pytest.mark.parametrize("weights", ["dense", "2:4"])
def test_gives_up_after_routing_when_an_expert_gets_too_many_rows(weights, monkeypatch):
    # every token to experts 0-2 (zero router: ties go to the lowest ids): more rows than the
    # kernels' limit -> status 2, no expert math, the step path's result
    from sparsewise.moe import layer

    # (dense shared experts take as few rows as the routed ones: none there, or it stops before)
    m = _build(torch.bfloat16, weights, ROUTERS["softmax"], 0 if weights == "dense" else 1, weights != "dense")
    most = m.experts.fused_args()[2]
    if most >= layer.FUSED_MAX_TOKENS:
        pytest.skip(f"this host's {weights} decode kernel takes any number of rows up to the fused limit")
    t = most + 1
    assert t <= layer.FUSED_MAX_TOKENS and -(-t * 3 // 6) <= most  # tried, not ruled out up front
    with torch.no_grad():
        m.router.weight.zero_()
    statuses = []
    real = layer._compiled_block

    def spy(rv, sv):
        fn = real(rv, sv)

        def call(*a):
            r = fn(*a)
            statuses.append(r[0])
            return r
        return call
    monkeypatch.setattr(layer, "_compiled_block", spy)
    x = torch.randn(t, D).bfloat16()
    with torch.inference_mode():
        assert m._fused_decode(x) is None
        y = m(x)
        counts = m.last_plan.counts_list
        y0, _ = _steps(m, x)
    assert statuses[0] == 2 and counts[:3] == [t, t, t]
    assert torch.equal(y, y0)


def test_shared_2_4_bf16_experts_stay_in_the_one_call_past_dprows_rows():
    from sparsewise.moe.experts import NM_GEMM_MIN_ROWS

    m = _build(torch.bfloat16, "2:4", ROUTERS["sigmoid-groups"], 2, False)
    if m.shared.fused_args()[0] != ("nm", "dp"):
        pytest.skip("needs AVX-512 BF16 (the 2:4 'dp' kernel)")
    assert m.shared.fused_args()[2] < 60 < NM_GEMM_MIN_ROWS  # beyond the one-expert crossover
    x = torch.randn(60, D).bfloat16()
    with torch.inference_mode():
        out = m._fused_decode(x)
        assert out is not None or max(m.router(x).counts_list) > m.experts.fused_args()[2]
        y, plan = m(x), m.last_plan
        y0, plan0 = _steps(m, x)
    assert torch.equal(plan.expert_ids, plan0.expert_ids)
    torch.testing.assert_close(y.float(), y0.float(), rtol=2e-2, atol=2e-2 * float(y0.float().abs().max()))
