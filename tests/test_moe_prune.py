"""prune_ reaches experts kept as stacked 3-D weights (issue 5 deliver 3 with issue 6's workflow):
sparsewise's Experts and transformers' Mixtral / Qwen2-MoE experts, each expert calibrated on the
tokens routed to it, then packed 2:4 without changing a weight."""
import copy

import pytest
import torch
import torch.nn as nn

from sparsewise.moe import MoE, RouterConfig
from sparsewise.moe.kernels import activate
from sparsewise.nm import is_nm, nm_mask, prune_
from sparsewise.nm.prune import sparsegpt_prune_weight, skip_head_and_routers


def hand_wanda(weight, rows, n=2, m=4):
    sq = (rows.double() ** 2).sum(0)
    return nm_mask(weight.detach().abs().double() * sq.sqrt().unsqueeze(0), n, m)


def routed_rows(moe, xs):
    """Per expert: the calibration rows the router sends to it (the router is not pruned)."""
    out = {e: [] for e in range(moe.config.num_experts)}
    with torch.no_grad():
        for x in xs:
            x2 = x.reshape(-1, moe.config.d_model)
            plan = moe.router(x2, None)
            off = plan.offsets.tolist()
            for e in range(moe.config.num_experts):
                out[e].append(x2[plan.token_index[off[e]:off[e + 1]]])
    return {e: torch.cat(v) for e, v in out.items()}


def test_wanda_calibrates_each_expert_on_its_routed_tokens():
    torch.manual_seed(0)
    moe = MoE(16, 12, 5, 2, shared_experts=1, shared_d_ff=8, shared_expert_gate=True)
    dense = copy.deepcopy(moe)
    xs = [torch.randn(1, 9, 16) for _ in range(3)]
    report = prune_(moe, "wanda", calibration=xs, progress=False)
    assert "experts.gate_up (5 experts)" in report.pruned and "shared.down (1 experts)" in report.pruned
    assert report.skipped["shared_gate"] == "excluded by filter_fn"  # routing gates stay dense
    assert torch.equal(moe.shared_gate.weight, dense.shared_gate.weight)
    assert torch.equal(moe.router.weight, dense.router.weight)
    rows = routed_rows(dense, xs)
    for e in range(5):
        if not rows[e].shape[0]:
            continue
        gu = dense.experts.gate_up[e]
        assert torch.equal(moe.experts.gate_up[e] != 0, hand_wanda(gu, rows[e]))
        # down is calibrated on what the (already pruned) gate_up produces for those tokens
        mid = activate(rows[e] @ moe.experts.gate_up[e].detach().T, "swiglu")
        assert torch.equal(moe.experts.down[e] != 0, hand_wanda(dense.experts.down[e], mid))
    # the shared expert sees every token
    allx = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.equal(moe.shared.gate_up[0] != 0, hand_wanda(dense.shared.gate_up[0], allx))


def test_sparsegpt_experts_reconstruct_better_than_magnitude_and_pack_exactly():
    torch.manual_seed(1)
    moe = MoE(32, 24, 4, 2, activation="geglu")
    dense = copy.deepcopy(moe)
    xs = [torch.randn(2, 20, 32) for _ in range(4)]
    prune_(moe, "sparsegpt", calibration=xs, progress=False)
    rows = routed_rows(dense, xs)
    for e in range(4):
        gu, ref = moe.experts.gate_up[e].detach(), dense.experts.gate_up[e].detach()
        assert is_nm(gu, 2, 4) and is_nm(moe.experts.down[e], 2, 4)
        x = rows[e]
        mag = ref * nm_mask(ref.abs(), 2, 4)
        err = ((x @ (gu - ref).T) ** 2).sum()
        err_mag = ((x @ (mag - ref).T) ** 2).sum()
        assert err < err_mag
        # the same as SparseGPT on that expert's own Hessian
        want = sparsegpt_prune_weight(ref, 2.0 * (x.double().T @ x.double()) / x.shape[0], 2, 4)
        torch.testing.assert_close(gu, want, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        want = moe(x)
        moe.sparsify_()  # packing keeps the pruned weights exactly
        torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


def test_expert_without_calibration_tokens_falls_back_to_magnitude():
    torch.manual_seed(2)
    moe = MoE(16, 8, 4, 1, RouterConfig(4, 1, scoring="sigmoid", expert_bias=True))
    moe.router.expert_bias[3] = -1e4  # expert 3 is never picked
    ref = moe.experts.gate_up[3].detach().clone()
    report = prune_(moe, "sparsegpt", calibration=[torch.randn(12, 16)], progress=False)
    assert report.magnitude_fallback == ["experts.gate_up[3]", "experts.down[3]"]
    assert "no calibration tokens" in str(report)
    torch.testing.assert_close(moe.experts.gate_up[3].detach(), ref * nm_mask(ref.abs(), 2, 4))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = MoE(d, 16, 6, 2)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return h


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_moe_layer_stack_is_pruned_block_by_block(method):
    torch.manual_seed(3)
    net = Net()
    dense = copy.deepcopy(net)
    xs = [torch.randn(1, 11, 8) for _ in range(3)]
    report = prune_(net, method, calibration=xs, progress=False)
    assert sorted(report.pruned) == sorted(["inp"] + [f"blocks.{i}.moe.experts.{p} (6 experts)"
                                                      for i in range(3) for p in ("gate_up", "down")])
    for b in net.blocks:
        assert all(is_nm(b.moe.experts.gate_up[e], 2, 4) and is_nm(b.moe.experts.down[e], 2, 4) for e in range(6))
    if method == "wanda":
        # block 1 was calibrated on the output of the pruned block 0 (inp, outside the stack, is
        # pruned after it, so the stack saw its dense output)
        with torch.no_grad():
            h1 = [net.blocks[1].norm(net.blocks[0](dense.inp(x))) for x in xs]
        rows = routed_rows(net.blocks[1].moe, h1)
        for e in range(6):
            if rows[e].shape[0]:
                want = hand_wanda(dense.blocks[1].moe.experts.gate_up[e], rows[e])
                assert torch.equal(net.blocks[1].moe.experts.gate_up[e] != 0, want)


def test_packed_experts_are_skipped_with_reason_and_bad_input_refused():
    moe = MoE(16, 8, 3, 1, expert_weights="2:4")
    with pytest.raises(ValueError, match="no prunable"):
        prune_(moe, "magnitude", progress=False)
    moe2 = MoE(16, 8, 3, 1)
    moe2.experts.sparsify_()
    report = prune_(nn.Sequential(nn.Linear(16, 16), moe2), "magnitude", progress=False)
    assert report.skipped["1.experts"] == "already packed 2:4"
    bad = MoE(16, 10, 3, 1)  # d_ff 10 is not a multiple of 4
    report = prune_(nn.Sequential(nn.Linear(16, 16), bad), "magnitude", progress=False)
    assert "not divisible by m=4" in report.skipped["1.experts"]
    before = copy.deepcopy(MoE(16, 8, 3, 1))
    moe3 = copy.deepcopy(before)
    with pytest.raises(ValueError, match="NaN"):
        prune_(moe3, "sparsegpt", calibration=[torch.full((4, 16), float("nan"))], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(moe3.state_dict().values(), before.state_dict().values()))


class WithIdleMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.idle = MoE(16, 8, 3, 1)  # never called by forward

    def forward(self, x):
        return self.lin(x)


def test_expert_stack_off_the_forward_path_is_skipped_with_reason():
    torch.manual_seed(5)
    model = WithIdleMoE()
    before = model.idle.experts.gate_up.detach().clone()
    report = prune_(model, "sparsegpt", calibration=[torch.randn(6, 16)], progress=False)
    assert report.pruned == ["lin"]
    assert "not on the forward path" in report.skipped["idle.experts"]
    assert torch.equal(model.idle.experts.gate_up, before)


def test_default_filter_keeps_routing_gates_dense():
    assert skip_head_and_routers("model.layers.0.mlp.gate", nn.Linear(8, 4)) is False
    assert skip_head_and_routers("model.layers.0.mlp.shared_expert_gate", nn.Linear(8, 1)) is False
    assert skip_head_and_routers("lm_head", nn.Linear(8, 4)) is False
    assert skip_head_and_routers("model.layers.0.mlp.gate_proj", nn.Linear(8, 4)) is True
    assert skip_head_and_routers("model.layers.0.mlp.experts", nn.Module()) is True


# ---------------------------------------------------------------- transformers' MoE models

transformers = pytest.importorskip("transformers")


def _tiny(kind):
    torch.manual_seed(4)
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=64)
        cfg._experts_implementation = "eager"
        return MixtralForCausalLM(cfg).eval()
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64)
    cfg._experts_implementation = "eager"
    return Qwen2MoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_hf_moe_model_pruned_then_packed_by_from_hf(kind):
    model = _tiny(kind)
    with torch.no_grad():
        for p in model.parameters():  # real values everywhere (some inits are zeros)
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    calib = [torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    dense = copy.deepcopy(model)
    report = prune_(model, "sparsegpt", calibration=calib, progress=False)
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        assert f"model.layers.{i}.mlp.experts.gate_up_proj ({ex.gate_up_proj.shape[0]} experts)" in report.pruned
        for e in range(ex.gate_up_proj.shape[0]):
            assert is_nm(ex.gate_up_proj[e], 2, 4) and is_nm(ex.down_proj[e], 2, 4)
        assert is_nm(layer.self_attn.q_proj.weight, 2, 4)
        # the router keeps its weights
        assert torch.equal(layer.mlp.gate.weight, dense.model.layers[i].mlp.gate.weight)
    if kind == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate" in report.skipped
        assert is_nm(model.model.layers[0].mlp.shared_expert.up_proj.weight, 2, 4)
    # pruned experts go into MoE.from_hf(..., "2:4") unchanged: same outputs as the pruned block
    block = model.model.layers[1].mlp
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(MoE.from_hf(block, "2:4")(x), block(x), atol=1e-5, rtol=1e-5)
    # and the pruned model still works
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]).logits).all()
