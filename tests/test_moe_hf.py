"""Equivalence with transformers' own MoE blocks (the installed version stores experts as
stacked 3-D parameters; the ModuleList layout of older versions is covered with a stand-in)."""
import pytest
import torch
import torch.nn as nn

from sparsewise.moe import MoE, reference_moe
from sparsewise.nm import is_nm, nm_mask

transformers = pytest.importorskip("transformers")


def _fill(block, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block


def mixtral_block(d=48, h=40, e=5, k=3, impl="eager"):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    return _fill(MixtralSparseMoeBlock(cfg).eval())


def qwen_block(d=48, h=24, e=6, k=2, shared=56, norm=False):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=h, num_experts=e, num_experts_per_tok=k,
                         shared_expert_intermediate_size=shared, norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    return _fill(Qwen2MoeSparseMoeBlock(cfg).eval(), seed=1)


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_equivalence(tokens, dtype):
    block = mixtral_block().to(dtype)
    moe = MoE.from_hf(block)
    x = torch.randn(1, tokens, 48).to(dtype)
    with torch.no_grad():
        want, got = block(x), moe(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_equivalence(norm):
    block = qwen_block(norm=norm)
    moe = MoE.from_hf(block)
    assert moe.shared is not None and moe.shared_gate is not None
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x), atol=1e-5, rtol=1e-5)
    # training path (autograd through the torch GEMMs) gives the same outputs
    torch.testing.assert_close(moe(x).detach(), block(x).detach(), atol=1e-5, rtol=1e-5)


def test_from_hf_2_4_packs_magnitude_pruned_experts():
    block = mixtral_block()
    moe = MoE.from_hf(block, expert_weights="2:4")
    gu, dn = moe.experts.dense_weights()
    assert moe.config.expert_weights == "2:4"
    for e in range(5):
        assert is_nm(gu[e], 2, 4) and is_nm(dn[e], 2, 4)
        torch.testing.assert_close(gu[e], block.experts.gate_up_proj[e] * nm_mask(block.experts.gate_up_proj[e].abs(), 2, 4))
    # an already-pruned block gives the same outputs dense and packed
    with torch.no_grad():
        for w in (block.experts.gate_up_proj, block.experts.down_proj):
            for e in range(5):
                w[e].mul_(nm_mask(w[e].abs(), 2, 4))
    x = torch.randn(1, 6, 48)
    with torch.no_grad():
        torch.testing.assert_close(MoE.from_hf(block, "2:4")(x), block(x), atol=1e-5, rtol=1e-5)


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        MoE.from_hf(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="expert_weights"):
        MoE.from_hf(mixtral_block(), expert_weights="4:8")


def test_modulelist_layout_of_older_transformers():
    # older transformers kept Mixtral experts as a ModuleList of w1 (gate), w3 (up), w2 (down)
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = nn.Linear(16, 12, bias=False), nn.Linear(16, 12, bias=False), nn.Linear(12, 16, bias=False)
            self.act_fn = nn.SiLU()

    class Gate(nn.Linear):
        top_k = 2

    class MixtralSparseMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate(16, 3, bias=False)
            self.experts = nn.ModuleList([Expert() for _ in range(3)])

    old = MixtralSparseMoeBlock()
    moe = MoE.from_hf(old)
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = moe(x)
        p = moe.last_plan
        gu = torch.stack([torch.cat([m.w1.weight, m.w3.weight]) for m in old.experts])
        dn = torch.stack([m.w2.weight for m in old.experts])
        torch.testing.assert_close(y, reference_moe(x, p.expert_ids, p.weights, gu, dn), atol=1e-5, rtol=1e-5)
