"""``SparseLinear`` and ``sparsify_``: N:M layers that are never much slower than nn.Linear.

Dispatch per call: the packed kernel where it wins (small batches: it reads fewer weight bytes),
the dense path where it does not (large batches, where MKL/oneDNN GEMMs are compute-bound). Which
batch sizes the kernel wins at is measured once per (shape, dtype, threads, machine) with the
paired harness over power-of-two probe batches and cached on disk (``<cache>/nm_dispatch.json``).
It is a set, not one crossover: on some CPUs torch's dense GEMM is fast at batch 1 and slow at
batch 8-32 (bf16 without native support), so the kernel can lose at 1 and win from 2 on. The dense
path needs the dense weight: it is materialised on the first call that takes it and kept (set
``NMConfig(dense_fallback=False)`` to never hold it, trading speed at large batch for memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._util import cached_measurement, num_threads
from .functional import _forward as _kernel_forward
from .functional import nm_linear
from .gpu import NEVER, semi_structured, sparse_min_batch
from .mask import check_nm
from .tensor import NMTensor

__all__ = ["NMConfig", "SparseLinear", "sparsify_", "SparsifyReport", "crossover_batch", "kernel_batches"]

_PROBE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class NMConfig:
    """How to sparsify: the N:M pattern and whether a dense copy may be kept for large batches."""

    n: int = 2
    m: int = 4
    dense_fallback: bool = True

    def __post_init__(self):
        check_nm(self.n, self.m)
        if not isinstance(self.dense_fallback, bool):
            raise TypeError(f"NMConfig.dense_fallback must be a bool, got {type(self.dense_fallback).__name__}")


def _crossover_key(o: int, k: int, dtype: torch.dtype, n: int, m: int) -> str:
    from ..advisor.probe import machine_info

    from .kernels import KERNELS_VERSION

    cpu = machine_info()["cpu_model"]
    # the kernels' version is in the key: a faster kernel moves the crossover, so a change to the
    # kernels measures it again instead of reusing the old one
    return f"{cpu}|{o}x{k}|{str(dtype).replace('torch.', '')}|{n}:{m}|t{num_threads()}|v{KERNELS_VERSION}"


def _measure_wins(weight: NMTensor) -> int:
    """Bit i set: the packed kernel clearly beats dense F.linear at batch ``_PROBE_BATCHES[i]``."""
    from ..bench import compare

    o, k = weight.shape
    dense = weight.to_dense()
    gen = torch.Generator().manual_seed(0)
    mask, losses = 0, 0
    for i, b in enumerate(_PROBE_BATCHES):
        x = torch.randn(b, k, generator=gen).to(weight.dtype)
        r = compare(lambda: nm_linear(x, weight), lambda: F.linear(x, dense), pairs=5, warmup=1, min_time=0.005)
        # keep the kernel only where it clearly wins: a near-tie measured on one warm weight
        # can turn into a loss on the cold weights of a real model
        if r.ratio >= 1.05:
            mask |= 1 << i
            losses = 0
        else:
            losses += 1
            if losses == 2:  # dense GEMMs only get more efficient with batch: stop probing
                break
    return mask


def kernel_batches(weight: NMTensor, *, refresh: bool = False) -> tuple[int, ...]:
    """The probe batch sizes (1, 2, 4, ..., 512 rows of x) at which the packed kernel was measured
    clearly faster than dense F.linear on this weight's shape and dtype, with
    :func:`sparsewise.bench.compare`; cached on disk per (machine, shape, dtype, N:M, threads,
    kernels' version). A batch between two probes takes the decision of the probe below it, one
    above 512 that of 512. Probing stops after two losses in a row."""
    o, k = weight.shape
    mask = cached_measurement("nm_dispatch.json", _crossover_key(o, k, weight.dtype, weight.n, weight.m),
                              lambda: _measure_wins(weight), refresh=refresh)
    return tuple(b for i, b in enumerate(_PROBE_BATCHES) if mask >> i & 1)


def crossover_batch(weight: NMTensor, *, refresh: bool = False) -> int:
    """Smallest probe batch at which the packed kernel does not clearly beat dense F.linear (see
    :func:`kernel_batches`, which this reads); a large number when it wins at every batch tried.
    The kernel may win again above it: :class:`SparseLinear` follows :func:`kernel_batches`."""
    wins = set(kernel_batches(weight, refresh=refresh))
    return next((b for b in _PROBE_BATCHES if b not in wins), 1 << 30)


def _batch_mask(wins) -> int:
    """``kernel_batches`` as a bit mask indexed by ``min(batch.bit_length() - 1, last probe)``."""
    mask = 0
    for i, b in enumerate(_PROBE_BATCHES):
        if b in wins:
            mask |= 1 << i
    return mask


_LAST_PROBE = len(_PROBE_BATCHES) - 1


class SparseLinear(nn.Module):
    """A linear layer whose weight is packed N:M.

    >>> lin = nn.Linear(64, 32)
    >>> sl = SparseLinear.from_dense(lin)              # 2:4 by magnitude
    >>> sl(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config: NMConfig = NMConfig(),
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % config.m:
            raise ValueError(f"in_features ({in_features}) is not divisible by m={config.m}")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        w = torch.zeros(out_features, in_features, dtype=dtype)
        self._set_packed(NMTensor.from_dense(w, config.n, config.m))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def _set_packed(self, nmt: NMTensor) -> None:
        self.values = nn.Parameter(nmt.values)
        self.register_buffer("indices", nmt.indices)
        self._nm = nmt
        self._dense = None  # (dense weight, values._version it was built from)
        self._wins = None
        self._gpu = None  # (values._version, dense, semi-structured or None, min batch, why not, values)

    @classmethod
    def from_dense(cls, linear: nn.Linear, n: int = 2, m: int = 4, mask: torch.Tensor | None = None,
                   config: NMConfig | None = None) -> "SparseLinear":
        """Pack an nn.Linear (magnitude N:M mask when ``mask`` is None; an already N:M-sparse
        weight keeps exactly its non-zeros)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        config = config or NMConfig(n=n, m=m)
        w = linear.weight.detach()
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.config = linear.in_features, linear.out_features, config
        self._set_packed(NMTensor.from_dense(w.cpu(), config.n, config.m, mask))
        self.bias = nn.Parameter(linear.bias.detach().clone().cpu()) if linear.bias is not None else None
        return self

    @property
    def weight_nm(self) -> NMTensor:
        """The packed weight, sharing storage with the ``values`` parameter and ``indices`` buffer."""
        nm, v, idx = self._nm, self.values, self.indices
        if nm.values.data_ptr() != v.data_ptr() or nm.values.dtype != v.dtype or nm.indices.data_ptr() != idx.data_ptr():
            # values or indices were replaced (module.to(), load_state_dict with assign=True, ...)
            self._rebuild()
            self._wins = None
        return self._nm

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the pruned weight (zeros in the N:M pattern)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_nm.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hot path for decode-sized calls: every attribute access below is a plain dict lookup
        # (nn.Module.__getattr__ costs more than the small layers' own work).
        params = self._parameters
        v, bias = params["values"], params.get("bias")
        g = self._gpu
        if (g is not None and g[5] is v and g[0] == v._version and x.is_cuda and x.dtype is g[1].dtype
                and not (torch.is_grad_enabled() and (v.requires_grad or x.requires_grad))):
            # CUDA inference, GPU state already built: as little Python as nn.Linear's own call
            sparse = g[2]
            if sparse is not None and x.numel() >= g[3] * self.in_features:
                return F.linear(x, sparse, bias)
            return F.linear(x, g[1], bias)
        nm = self._nm
        if nm.values.data_ptr() != v.data_ptr() or nm.values.dtype != v.dtype:
            nm = self.weight_nm
        dtype = nm.values.dtype
        is_tensor = isinstance(x, torch.Tensor)
        training = is_tensor and torch.is_grad_enabled() and (v.requires_grad or x.requires_grad)
        fits = (is_tensor and not training and x.dtype == dtype and x.dim() >= 1
                and x.shape[-1] == self.in_features)
        if fits and v.is_cuda and x.is_cuda:
            return self._forward_cuda(x, nm, v, bias)
        if not fits or x.device.type != "cpu" or dtype not in _KERNEL_DTYPES:
            # training, or input that nm_linear must check and explain
            return nm_linear(x, nm, bias, values=v if training else None)
        batch = x.numel() // self.in_features
        if self.config.dense_fallback and batch > 0:
            wins = self._wins
            if wins is None:
                wins = self._wins = _batch_mask(kernel_batches(nm))
            if not wins >> min(batch.bit_length() - 1, _LAST_PROBE) & 1:
                dense = self._dense
                # rebuilt whenever the values changed in place (an optimizer step bumps _version)
                if dense is None or dense[1] != v._version:
                    dense = self._dense = (nm.to_dense(), v._version)
                return F.linear(x, dense[0], bias)
        return _kernel_forward(x, nm, bias, "auto")  # nm_linear's kernel path, minus its checks

    def cpu_path(self, batch: int) -> str:
        """Which path a CPU inference call with ``batch`` rows of x takes: "kernel" or "dense"
        (measures the dispatch on first use, like the first such call)."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if not self.config.dense_fallback or self.values.dtype not in _KERNEL_DTYPES:
            return "kernel"
        if self._wins is None:
            self._wins = _batch_mask(kernel_batches(self.weight_nm))
        return "kernel" if self._wins >> min(batch.bit_length() - 1, _LAST_PROBE) & 1 else "dense"

    def _forward_cuda(self, x, nm, v, bias):
        g = self._gpu
        if g is None or g[0] != v._version or g[5] is not v:
            dense = nm.to_dense()
            sparse, why = semi_structured(dense) if (nm.n, nm.m) == (2, 4) else (None, "only 2:4 runs sparse on GPUs")
            min_batch = sparse_min_batch(dense, sparse) if sparse is not None else NEVER
            g = self._gpu = (v._version, dense, sparse, min_batch, why, v)
        _, dense, sparse, min_batch, _, _ = g
        if sparse is not None and x.numel() // self.in_features >= min_batch:
            return F.linear(x, sparse, bias)
        return F.linear(x, dense, bias)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._rebuild()  # device or dtype may have changed
        self._wins = None
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        out = super()._load_from_state_dict(*args, **kwargs)
        self._rebuild()  # indices were copied in place: the cached positions are stale
        return out

    def _rebuild(self) -> None:
        self._nm = NMTensor(self.values.detach(), self.indices, self.config.n, self.config.m,
                            (self.out_features, self.in_features))
        self._dense = None
        self._gpu = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.config.n}:{self.config.m}")


@dataclass
class SparsifyReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def sparsify_(model: nn.Module, config: NMConfig = NMConfig(),
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> SparsifyReport:
    """Swap nn.Linear layers of ``model`` in place for SparseLinear (magnitude N:M mask, which keeps
    an already-pruned weight exactly). Returns what was swapped and what was skipped, and why.

    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> rep = sparsify_(model)
    >>> rep.swapped, rep.skipped
    (['0', '2'], {})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, NMConfig):
        raise TypeError(f"config must be an NMConfig, got {type(config).__name__}")
    report = SparsifyReport()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, SparseLinear):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            report.skipped[name] = "excluded by filter_fn"
            continue
        if name == "":
            report.skipped["<model>"] = "the model is itself an nn.Linear: use SparseLinear.from_dense(model)"
            continue
        if module.in_features % config.m:
            report.skipped[name] = f"in_features={module.in_features} is not divisible by m={config.m}"
            continue
        if module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            report.skipped[name] = f"weight dtype {module.weight.dtype} is not supported"
            continue
        device = module.weight.device
        if device.type not in ("cpu", "cuda"):
            report.skipped[name] = f"device {device.type} is not supported"
            continue
        new = SparseLinear.from_dense(module, config=config).to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        report.swapped.append(name)
    if not report.swapped and not report.skipped:
        report.skipped["<model>"] = "no nn.Linear layer found"
    return report
