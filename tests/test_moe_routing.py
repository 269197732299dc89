import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsewise.moe import (Router, RouterConfig, build_plan, capacity_keep_mask, expert_capacity,
                            load_balancing_loss, router_z_loss)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="scoring"):
        RouterConfig(4, 2, scoring="relu")
    with pytest.raises(ValueError, match="n_group"):
        RouterConfig(6, 2, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        RouterConfig(8, 4, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="num_experts"):
        RouterConfig(0, 1)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        RouterConfig(4, 1, aux_loss_coef=float("nan"))


def test_nan_logits_raise():
    r = Router(8, RouterConfig(4, 2))
    logits = torch.randn(3, 4)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        r.plan_from_logits(logits)
    with pytest.raises(ValueError, match="d_model"):
        r(torch.randn(3, 7))


def test_softmax_topk_matches_mixtral_rule():
    torch.manual_seed(0)
    r = Router(16, RouterConfig(8, 2))
    x = torch.randn(11, 16)
    plan = r(x)
    p = torch.softmax(x @ r.weight.T, -1)
    top, ids = p.topk(2, -1)
    assert torch.equal(plan.expert_ids, ids)
    torch.testing.assert_close(plan.weights, top / top.sum(-1, keepdim=True))


def test_plan_sorted_by_expert_with_offsets():
    ids = torch.tensor([[2, 0], [2, 4], [0, 2]])
    w = torch.rand(3, 2)
    plan = build_plan(ids, w, 5)
    assert plan.counts_list == [2, 0, 3, 0, 1]
    assert plan.offsets.tolist() == [0, 2, 2, 5, 5, 6]
    assert plan.token_index.tolist() == [0, 2, 0, 1, 2, 1]  # stable: token order within an expert
    assert torch.equal(ids.reshape(-1)[plan.slot], torch.tensor([0, 0, 2, 2, 2, 4]))
    assert plan.used_experts() == [0, 2, 4]
    with pytest.raises(ValueError, match="expert ids"):
        build_plan(torch.tensor([[5]]), torch.ones(1, 1), 5)


def test_balancing_loss_hand_computed():
    # 4 tokens, 3 experts, top-1: expert 0 gets 2 tokens, experts 1 and 2 one each
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    ids = torch.tensor([[0], [0], [1], [2]])
    # f = (0.5, 0.25, 0.25); P = (0.4, 0.375, 0.225); E * sum f P = 3 * (0.2 + 0.09375 + 0.05625) = 1.05
    assert float(load_balancing_loss(probs, ids, 3, alpha=0.01)) == pytest.approx(0.0105)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = log 2 and 1 + log 2
    want = 0.5 * (math.log(2) ** 2 + (1 + math.log(2)) ** 2)
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)


def test_losses_reach_the_router_weight():
    torch.manual_seed(1)
    r = Router(8, RouterConfig(4, 2, aux_loss_coef=0.01, z_loss_coef=1e-3))
    plan = r(torch.randn(9, 8))
    (plan.aux_loss + plan.z_loss + plan.weights.sum()).backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def _switch_drops(ids, e, cap):
    # Switch / GShard: first choices of all tokens in token order, then second choices, ...
    fill = [0] * e
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for j in range(ids.shape[1]):
        for t in range(ids.shape[0]):
            x = int(ids[t, j])
            if fill[x] < cap:
                fill[x] += 1
                keep[t, j] = True
    return keep


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 40), e=st.integers(1, 7), k=st.integers(1, 3), cf=st.floats(0.1, 2.0), seed=st.integers(0, 99))
def test_capacity_drops_exactly_switch_semantics(t, e, k, cf, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    cap = expert_capacity(cf, t, k, e)
    assert cap == math.ceil(cf * t * k / e)
    want = _switch_drops(ids, e, cap)
    assert torch.equal(capacity_keep_mask(ids, e, cap), want)
    plan = build_plan(ids, torch.ones(t, k), e, capacity_factor=cf)
    assert plan.dropped == int((~want).sum())
    assert plan.dropped_fraction == pytest.approx(plan.dropped / (t * k))
    assert max(plan.counts_list) <= cap
    kept = sorted(plan.slot.tolist())
    assert kept == want.reshape(-1).nonzero().squeeze(1).tolist()


def test_sigmoid_bias_steers_selection_not_weights():
    r = Router(4, RouterConfig(4, 1, scoring="sigmoid", expert_bias=True, norm_topk_prob=False))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert r.plan_from_logits(logits).expert_ids.item() == 0
    r.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    plan = r.plan_from_logits(logits)
    assert plan.expert_ids.item() == 1
    assert plan.weights.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_bias_update_moves_toward_balance():
    r = Router(4, RouterConfig(4, 1, scoring="sigmoid", expert_bias=True, bias_update_rate=0.1))
    r.update_bias(torch.tensor([6, 2, 0, 0]))
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    plain = Router(4, RouterConfig(4, 1))
    with pytest.raises(ValueError, match="bias"):
        plain.update_bias(torch.tensor([1, 1, 1, 1]))


def test_group_limited_topk_only_picks_from_best_groups():
    cfg = RouterConfig(8, 2, scoring="sigmoid", n_group=4, topk_group=1, routed_scaling_factor=2.5)
    r = Router(4, cfg)
    # group 2 (experts 4, 5) has the best two-expert sum even though expert 0 is the single best
    logits = torch.tensor([[3.0, -5.0, 0.0, 0.0, 2.0, 2.0, -1.0, -1.0]])
    plan = r.plan_from_logits(logits)
    assert sorted(plan.expert_ids[0].tolist()) == [4, 5]
    assert float(plan.weights.sum()) == pytest.approx(2.5)


def test_empty_batch():
    r = Router(8, RouterConfig(4, 2, aux_loss_coef=0.1, z_loss_coef=0.1))
    plan = r(torch.randn(0, 8))
    assert plan.counts_list == [0, 0, 0, 0] and plan.token_index.numel() == 0
    assert float(plan.aux_loss.detach()) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_build_plan_is_a_stable_sort_by_expert(num_experts, k, tokens, seed):
    # the CPU plan comes from a compiled counting sort: the same as torch's stable sort
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (tokens, k), generator=g)
    w = torch.rand(tokens, k, generator=g)
    plan = build_plan(ids, w, num_experts)
    flat = ids.reshape(-1)
    slot = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(plan.slot, slot) and torch.equal(plan.token_index, slot // k)
    assert torch.equal(plan.counts, counts) and plan.counts_list == counts.tolist()
    assert torch.equal(plan.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    torch.testing.assert_close(plan.sorted_weights, w.reshape(-1)[slot])
    if tokens:
        bad = ids.clone()
        bad[-1, -1] = num_experts
        with pytest.raises(ValueError, match="expert ids must lie"):
            build_plan(bad, w, num_experts)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(8, 2, 1, 1), (6, 3, 1, 1), (12, 4, 4, 2), (16, 6, 8, 3), (5, 5, 1, 1)]),
       st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.booleans(), st.sampled_from([1.0, 2.5]),
       st.integers(0, 9), st.integers(0, 2**31 - 1))
def test_compiled_inference_routing_matches_the_torch_path(shape, scoring, norm, bias, scale, tokens, seed):
    # without autograd the CPU router scores, selects and plans in one compiled call; with it,
    # torch ops: the same plan (ties are measure-zero with random logits)
    e, k, n_group, topk_group = shape
    cfg = RouterConfig(e, k, scoring=scoring, norm_topk_prob=norm, expert_bias=bias, n_group=n_group,
                       topk_group=topk_group, routed_scaling_factor=scale)
    g = torch.Generator().manual_seed(seed)
    r = Router(8, cfg)
    if bias:
        r.expert_bias.copy_(0.3 * torch.randn(e, generator=g))
    logits = 3 * torch.randn(tokens, e, generator=g)
    with torch.no_grad():
        fast = r.plan_from_logits(logits)
    slow = r.plan_from_logits(logits.clone().requires_grad_())
    assert torch.equal(fast.expert_ids, slow.expert_ids)
    torch.testing.assert_close(fast.weights, slow.weights.detach(), rtol=2e-6, atol=1e-7)
    for name in ("slot", "token_index", "counts", "offsets"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.counts_list == slow.counts_list


def test_compiled_routing_rejects_non_finite_logits():
    r = Router(4, RouterConfig(4, 2))
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        r.plan_from_logits(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))
