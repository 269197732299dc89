"""sparsewise.moe on a CUDA device: the torch path (no CPU kernels) must give the CPU's outputs and
gradients, for dense and 2:4 expert weights. Marked gpu: skipped without CUDA."""
import copy

import pytest
import torch

from sparsewise.moe import MoE, RouterConfig

pytestmark = pytest.mark.gpu


def _pair(weights, router=None, shared=0, seed=0):
    torch.manual_seed(seed)
    cpu = MoE(48, 40, 6, 2, router=router, expert_weights=weights, shared_experts=shared)
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.parametrize("weights", ["dense", "2:4"])
@pytest.mark.parametrize("t", [1, 7, 130])
def test_forward_on_cuda_matches_cpu(weights, t):
    cpu, gpu = _pair(weights)
    x = torch.randn(t, 48)
    with torch.no_grad():
        ref = cpu(x)
        y = gpu(x.cuda())
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert gpu.last_plan.counts_list == cpu.last_plan.counts_list


def test_backward_on_cuda_matches_cpu():
    router = RouterConfig(6, 2, scoring="sigmoid", expert_bias=True, aux_loss_coef=0.01, z_loss_coef=1e-3)
    cpu, gpu = _pair("dense", router=router, shared=1)
    x = torch.randn(2, 9, 48)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    (cpu(xc).square().mean() + cpu.aux_loss()).backward()
    (gpu(xg).square().mean() + gpu.aux_loss()).backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=1e-4, rtol=1e-3)
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if pc.grad is None:
            assert pg.grad is None, name
            continue
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_on_cuda_close_to_fp32():
    cpu, gpu = _pair("dense")
    gpu = gpu.to(torch.bfloat16)
    x = torch.randn(16, 48)
    with torch.no_grad():
        ref = cpu(x)
        y = gpu(x.cuda().bfloat16()).float().cpu()
    assert (y - ref).norm() / ref.norm() < 3e-2
