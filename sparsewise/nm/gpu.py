"""GPU path: PyTorch's semi-structured 2:4 sparse tensors (cuSPARSELt / CUTLASS) where they win.

On CUDA, SparseLinear keeps the pruned weight dense and, where torch allows it (2:4, float16 or
bfloat16, shapes meeting the backend's minimums), a ``to_sparse_semi_structured`` copy. Each call
takes the sparse copy only from the batch size at which it was *measured* faster than dense on
this GPU (it is often slower at small batch: pytorch #111339 saw 0.11x at batch 1), so the layer
is never slower than the dense one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._util import cached_measurement

__all__ = ["semi_structured", "sparse_min_batch"]

_PROBE_BATCHES = (1, 8, 32, 128, 512, 2048, 8192)
NEVER = 1 << 30


def semi_structured(dense: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """A semi-structured sparse copy of a 2:4-pruned CUDA weight, or (None, why not)."""
    if not dense.is_cuda:
        return None, "the weight is not on a CUDA device"
    if dense.dtype not in (torch.float16, torch.bfloat16):
        return None, f"semi-structured sparsity needs float16 or bfloat16, the weight is {dense.dtype}"
    try:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(dense)
        # some backends only fail at the first product (CUTLASS kernels are built for sm_8x only)
        torch.nn.functional.linear(torch.zeros(8, dense.shape[1], device=dense.device, dtype=dense.dtype), sparse)
        return sparse, ""
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # shape minimums, no cuSPARSELt, old GPU
        return None, str(exc).strip().splitlines()[0]


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def sparse_min_batch(dense: torch.Tensor, sparse: torch.Tensor, *, refresh: bool = False) -> int:
    """Smallest batch at which ``F.linear(x, sparse)`` is >= 5% faster than with ``dense`` on this
    GPU, measured with :func:`sparsewise.bench.compare` and cached; ``NEVER`` if it never is."""
    from ..bench import compare

    o, k = dense.shape
    key = f"{torch.cuda.get_device_name(dense.device)}|{o}x{k}|{str(dense.dtype).replace('torch.', '')}"

    def measure() -> int:
        for b in _PROBE_BATCHES:
            x = torch.randn(b, k, device=dense.device, dtype=dense.dtype)
            r = compare(_synced(lambda: F.linear(x, sparse)), _synced(lambda: F.linear(x, dense)),
                        pairs=5, warmup=2, min_time=0.005)
            if r.ratio >= 1.05:
                return b
        return NEVER

    return cached_measurement("nm_gpu_crossover.json", key, measure, refresh=refresh)
