"""Table storage: huge-page backed allocation and row quantization (bf16, fp16, row-wise int8).

Stored layouts (rows are what the kernels gather):
- fp32: (num_rows, D) float32.  bf16 / fp16: (num_rows, D) bfloat16 / float16.
- int8: (num_rows, ceil4(D) + 8) uint8: D unsigned codes, padding to 4 bytes, then the row's
  fp32 scale and fp32 bias. A value is ``code * scale + bias`` with ``bias = min(row)`` and
  ``scale = (max(row) - min(row)) / 255``.

Error bounds of a stored value against the fp32 original w (tested in tests/test_embedding_storage.py):
- bf16: |err| <= 2^-8 * |w| (round to nearest, 8 significant bits).
- fp16: |err| <= 2^-11 * |w| for normal values (|w| >= 2^-14), <= 2^-25 absolute below; values beyond
  fp16's range (|w| > 65504) are refused, not clamped.
- int8: |err| <= scale / 2 = (max(row) - min(row)) / 510, plus fp32 rounding of the dequantization.
  A pooled sum over L ids errs by at most the sum of the L rows' bounds, times |weight| per id.

Large tables are allocated on transparent huge pages (``madvise(MADV_HUGEPAGE)``, 2 MB pages)
where the kernel allows it: a random row gather then misses the TLB far less often.
"""
from __future__ import annotations

import mmap
import sys
import threading

import torch

from .config import row_bytes

__all__ = ["alloc_rows", "output_rows", "quantize_rows", "dequantize_rows", "storage_dtype", "HUGE_MIN_BYTES"]

HUGE_MIN_BYTES = 8 << 20  # below this a table fits in cache anyway; plain torch memory
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.uint8}


def storage_dtype(dtype: str) -> torch.dtype:
    return _TORCH[dtype]


def _huge_mapping(nbytes: int) -> mmap.mmap:
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernel without THP: plain pages
            pass
    return mm


OUTPUT_POOL_BYTES = 256 << 20  # the most memory output_rows keeps mapped for reuse
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def output_rows(num_rows: int, width: int) -> torch.Tensor:
    """An uninitialised (num_rows, width) float32 tensor for a kernel's output, which the caller
    overwrites entirely. Large outputs reuse huge-page mappings that no tensor references any more:
    a fresh 32 MB mapping costs the kernel zeroing 16 huge pages first (measured 1.8 ms, 4-8% of
    a batch-8192 lookup). A mapping is free when only the pool holds it (every tensor and view
    made from it keeps a reference: ``torch.frombuffer``). At most ``OUTPUT_POOL_BYTES`` stay
    mapped; past that, outputs get their own mapping, freed with them."""
    nbytes = num_rows * width * 4
    if nbytes < HUGE_MIN_BYTES:
        return torch.empty(num_rows, width, dtype=torch.float32)
    with _pool_lock:
        mm = next((m for m in _pool if len(m) == nbytes and sys.getrefcount(m) == 3), None)  # list, m, the call
        if mm is None:
            mm = _huge_mapping(nbytes)
            if sum(len(m) for m in _pool) + nbytes > OUTPUT_POOL_BYTES:
                # drop free mappings of other sizes first; keep the new one only if it then fits
                _pool[:] = [m for m in _pool if sys.getrefcount(m) > 3]
            if sum(len(m) for m in _pool) + nbytes <= OUTPUT_POOL_BYTES:
                _pool.append(mm)
        return torch.frombuffer(mm, dtype=torch.float32).view(num_rows, width)


def alloc_rows(num_rows: int, dim: int, dtype: str, *, huge: bool = True) -> torch.Tensor:
    """An uninitialised, writable, contiguous storage tensor for ``num_rows`` rows of ``dtype``.

    Tables of at least ``HUGE_MIN_BYTES`` are backed by an anonymous mapping advised to use huge
    pages (a no-op where the kernel has them disabled). The tensor keeps the mapping alive.
    """
    width = dim if dtype != "int8" else row_bytes(dim, "int8")
    tdtype = _TORCH[dtype]
    nbytes = num_rows * width * torch.tensor([], dtype=tdtype).element_size()
    if not huge or nbytes < HUGE_MIN_BYTES:
        return torch.empty(num_rows, width, dtype=tdtype)
    mm = _huge_mapping(nbytes)
    # torch.frombuffer holds a reference to the mapping for the tensor's lifetime
    return torch.frombuffer(mm, dtype=tdtype).view(num_rows, width)


def quantize_rows(w: torch.Tensor, dtype: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Convert fp32 rows ``w`` (N, D) to the stored layout of ``dtype`` (see the module docstring)."""
    if w.dtype != torch.float32 or w.dim() != 2:
        raise TypeError(f"quantize_rows expects a 2-D float32 tensor, got {w.dtype} of shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a table holding NaN or Inf values")
    n, d = w.shape
    if out is None:
        out = alloc_rows(n, d, dtype)
    if dtype in ("fp32", "bf16", "fp16"):
        big = float(w.abs().max()) if dtype == "fp16" and w.numel() else 0.0
        if big > 65504.0:
            raise ValueError(f"a value of magnitude {big:.6g} does not fit fp16 (max 65504); use bf16 or int8")
        out.copy_(w)  # bf16 / fp16: round to nearest
    elif dtype == "int8":
        chunk = 1 << 16  # bounded temporaries for tables of any size
        pad = (d + 3) // 4 * 4
        for lo in range(0, n, chunk):
            blk = w[lo:lo + chunk]
            mn = blk.amin(dim=1, keepdim=True) if d else torch.zeros(blk.shape[0], 1)
            mx = blk.amax(dim=1, keepdim=True) if d else torch.zeros(blk.shape[0], 1)
            scale = (mx - mn) / 255.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round((blk - mn) / safe).clamp_(0, 255).to(torch.uint8)  # in range by construction
            dst = out[lo:lo + chunk]
            dst[:, :d] = codes
            dst[:, d:pad] = 0
            sb = torch.cat([scale, mn], dim=1).contiguous()  # (rows, 2) float32
            dst[:, pad:pad + 8] = sb.view(torch.uint8).view(-1, 8)
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    return out


def dequantize_rows(stored: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """fp32 rows (N, dim) from a stored table; the inverse of :func:`quantize_rows` up to its error bound."""
    if dtype in ("fp32", "bf16", "fp16"):
        return stored.to(torch.float32)
    if dtype == "int8":
        pad = (dim + 3) // 4 * 4
        sb = stored[:, pad:pad + 8].contiguous().view(torch.float32)  # (N, 2)
        return stored[:, :dim].to(torch.float32) * sb[:, :1] + sb[:, 1:2]
    raise ValueError(f"unknown dtype {dtype!r}")
