"""GPU path of sparsewise.nm (semi-structured 2:4 via torch). Marked gpu: skipped without CUDA."""
import pytest
import torch
import torch.nn as nn

from sparsewise.nm import SparseLinear, sparsify_
from sparsewise.nm.gpu import NEVER, semi_structured, sparse_min_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_sparse_linear_on_cuda_matches_dense(dtype, batch):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(dtype)
    sl = SparseLinear.from_dense(lin).cuda()
    ref = sl.to_linear().cuda()
    x = torch.randn(batch, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), ref(x), rtol=2e-2, atol=2e-2)
    assert sl._gpu is not None
    _, dense, sparse, min_batch, why, _ = sl._gpu
    assert (sparse is not None) or why  # either it runs sparse or it says why not
    assert isinstance(min_batch, int) and min_batch >= 1


def test_semi_structured_refuses_fp32_with_a_reason():
    w = torch.randn(64, 64, device="cuda")
    sparse, why = semi_structured(w)
    assert sparse is None and "float16" in why


def test_semi_structured_refuses_small_shapes_with_a_reason():
    w = torch.zeros(8, 8, device="cuda", dtype=torch.float16)
    sparse, why = semi_structured(w)
    assert sparse is None and why


def test_sparse_min_batch_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    sl = SparseLinear.from_dense(nn.Linear(512, 512).half()).cuda()
    dense = sl.weight_nm.to_dense()
    sparse, why = semi_structured(dense)
    if sparse is None:
        pytest.skip(f"semi-structured sparsity unavailable here: {why}")
    first = sparse_min_batch(dense, sparse)
    assert first == NEVER or first >= 1
    assert (tmp_path / "nm_gpu_crossover.json").exists()
    assert sparse_min_batch(dense, sparse) == first


def test_training_on_cuda_keeps_pattern():
    torch.manual_seed(1)
    sl = SparseLinear.from_dense(nn.Linear(64, 32)).cuda()
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    x = torch.randn(16, 64, device="cuda")
    before = sl.weight_nm.to_dense() == 0
    for _ in range(3):
        opt.zero_grad()
        sl(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(sl.weight_nm.to_dense() == 0, before) or bool((sl.weight_nm.to_dense()[before] == 0).all())


def test_sparsify_moves_layers_with_their_device():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).cuda()
    rep = sparsify_(model)
    assert rep.swapped == ["0", "2"]
    assert model[0].values.is_cuda and model[0].indices.is_cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forced_sparse_path_matches_dense_for_3d_input(dtype):
    torch.manual_seed(2)
    lin = nn.Linear(512, 256).to(dtype)
    sl = SparseLinear.from_dense(lin).cuda()
    ref = sl.to_linear().cuda()
    x = torch.randn(3, 5, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        sl(x)  # builds the GPU state
        if sl._gpu[2] is None:
            pytest.skip(f"semi-structured sparsity unavailable here: {sl._gpu[4]}")
        sl._gpu = sl._gpu[:3] + (1,) + sl._gpu[4:]  # take the sparse path at every batch
        torch.testing.assert_close(sl(x), ref(x), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(sl(x[0, :1]), ref(x[0, :1]), rtol=2e-2, atol=2e-2)


def test_backward_on_cuda_matches_dense_reference():
    torch.manual_seed(3)
    lin = nn.Linear(96, 40)
    sl = SparseLinear.from_dense(lin).cuda()
    ref = sl.to_linear().cuda()
    mask = (sl.to_linear().weight != 0).cuda()
    x = torch.randn(2, 7, 96, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    sl(x).sin().sum().backward()
    ref(x2).sin().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sl.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    dense_grad = torch.zeros_like(ref.weight)
    nm = sl.weight_nm
    grad_nm = type(nm)(sl.values.grad, nm.indices, nm.n, nm.m, nm.shape).to_dense()
    dense_grad[mask] = ref.weight.grad[mask]
    torch.testing.assert_close(grad_nm, dense_grad, rtol=1e-4, atol=1e-5)


def test_cuda_inference_sees_in_place_weight_changes():
    torch.manual_seed(4)
    sl = SparseLinear.from_dense(nn.Linear(128, 64).half()).cuda()
    x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        before = sl(x).clone()
        sl.values.mul_(2)  # bumps the version: the cached dense/sparse copies must be rebuilt
        after = sl(x)
        torch.testing.assert_close(after - sl.bias, 2 * (before - sl.bias), rtol=2e-2, atol=2e-2)
        with pytest.raises((TypeError, RuntimeError)):
            sl(x.float())
