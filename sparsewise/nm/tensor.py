"""Packed N:M weights: kept values plus position indices in as few bits as the pattern needs.

Legend: O = out_features (rows), K = in_features, G = K / M groups per row, NK = G * N kept
values per row, b = bits per index = ceil(log2 M) (2 for 2:4, so 4 bits per group of 4).

Layout (format version 1):
- ``values``  (O, NK)  same dtype as the dense weight; within a group, in increasing position.
- ``indices`` (O, ceil(NK * b / 8)) uint8: a little-endian bit stream per row, index j of the row
  at bits [j*b, (j+1)*b). For 2:4 with K % 32 == 0 a row is a whole number of uint32 words, each
  holding the 16 indices of 8 groups (32 inputs): exactly what the AVX-512 kernel reads.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .._util import atomic_path
from .mask import check_nm, is_nm, nm_mask

__all__ = ["NMTensor", "FORMAT_NAME", "FORMAT_VERSION", "index_bits"]

FORMAT_NAME = "sparsewise.nm"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def index_bits(m: int) -> int:
    """Bits needed for one position inside a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def _pack_bits(idx: torch.Tensor, b: int) -> torch.Tensor:
    # idx: (O, NK) int64 in [0, 2**b) -> (O, ceil(NK*b/8)) uint8, little-endian bit stream per row
    o, nk = idx.shape
    shifts = torch.arange(b, dtype=torch.int64)
    bits = ((idx.unsqueeze(-1) >> shifts) & 1).reshape(o, nk * b)
    nbytes = (nk * b + 7) // 8
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - nk * b)).reshape(o, nbytes, 8)
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (bits * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, nk: int, b: int) -> torch.Tensor:
    # packed: (O, nbytes) uint8 -> (O, NK) int64
    o = packed.shape[0]
    dev = packed.device
    bits = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=dev)) & 1).reshape(o, packed.shape[1] * 8)[:, : nk * b]
    return (bits.reshape(o, nk, b) << torch.arange(b, device=dev)).sum(-1)


class NMTensor:
    """A 2-D weight (O, K) stored in N:M packed form.

    >>> w = torch.randn(8, 16)
    >>> p = NMTensor.from_dense(w, n=2, m=4)           # magnitude mask
    >>> torch.equal(p.to_dense(), w * nm_mask(w.abs(), 2, 4))
    True
    >>> p.nbytes < w.numel() * w.element_size()
    True
    """

    __slots__ = ("values", "indices", "n", "m", "shape", "_dense_idx", "_kernel_args")

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, shape: tuple[int, int]):
        n, m = check_nm(n, m)
        o, k = (int(s) for s in shape)
        if k % m:
            raise ValueError(f"in_features ({k}) is not divisible by m={m}")
        nk = k // m * n
        if values.dim() != 2 or tuple(values.shape) != (o, nk):
            raise ValueError(f"values must have shape {(o, nk)} for a {o}x{k} {n}:{m} weight, got {tuple(values.shape)}")
        if values.dtype not in _DTYPES.values():
            raise TypeError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
        nbytes = (nk * index_bits(m) + 7) // 8
        if indices.dtype != torch.uint8 or tuple(indices.shape) != (o, nbytes):
            raise ValueError(f"indices must be uint8 of shape {(o, nbytes)}, got {indices.dtype} {tuple(indices.shape)}")
        self.values = values.contiguous()
        self.indices = indices.contiguous()
        self.n, self.m, self.shape = n, m, (o, k)
        self._dense_idx = None
        self._kernel_args = None  # numpy views for the CPU kernels, built on first use

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int = 2, m: int = 4, mask: torch.Tensor | None = None) -> "NMTensor":
        """Pack a dense (O, K) weight. ``mask=None`` keeps the ``n`` largest magnitudes per group
        (an already N:M-sparse weight therefore round-trips exactly); a given mask must be N:M."""
        n, m = check_nm(n, m)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if weight.dtype not in _DTYPES.values():
            raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
        o, k = weight.shape
        if k % m:
            raise ValueError(f"in_features ({k}) is not divisible by m={m}: cannot use a {n}:{m} pattern")
        w = weight.detach().cpu()
        if mask is None:
            # NaN ranks as largest so it is kept and propagates as it would in the dense layer
            mag = w.abs().to(torch.float32).nan_to_num(nan=float("inf"))
            mask = nm_mask(mag, n, m)
        else:
            if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
                raise ValueError(f"mask must be a tensor of shape {tuple(weight.shape)}")
            mask = mask.detach().cpu().to(torch.bool)
            if not is_nm(mask.to(torch.uint8), n, m):
                raise ValueError(f"mask is not {n}:{m}: some group of {m} keeps more than {n}")
            # drop what the caller's mask drops (torch.where, not a product: NaN * 0 is NaN) ...
            w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
            # ... then groups keeping fewer than n get explicit zeros at the first free positions
            mask = nm_mask(mask.to(torch.float32), n, m)
        g = k // m
        pos = mask.reshape(o, g, m).nonzero()[:, 2].reshape(o, g, n)  # increasing within a group
        vals = torch.gather(w.reshape(o, g, m), 2, pos).reshape(o, g * n)
        idx = _pack_bits(pos.reshape(o, g * n), index_bits(m))
        return cls(vals.contiguous(), idx, n, m, (o, k))

    # ------------------------------------------------------------ views
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    def positions(self) -> torch.Tensor:
        """(O, NK) int64 column of each kept value in the dense weight (cached)."""
        if self._dense_idx is None:
            o, k = self.shape
            nk = self.values.shape[1]
            local = _unpack_bits(self.indices, nk, index_bits(self.m))
            group = torch.arange(nk, dtype=torch.int64, device=self.indices.device) // self.n
            self._dense_idx = local + group * self.m
        return self._dense_idx

    def to_dense(self) -> torch.Tensor:
        """The dense (O, K) weight, pruned positions zero. 2:4 on CPU takes the compiled
        expander (tens of times faster than the scatter, and it caches no positions)."""
        if (self.n, self.m) == (2, 4) and self.values.device.type == "cpu":
            from .kernels import decompress_24

            return decompress_24(self.values, self.indices)
        return self.scatter_dense()

    def scatter_dense(self) -> torch.Tensor:
        """``to_dense`` in plain torch (a scatter of the kept values): the reference the
        compiled expander is tested against, and the path on other devices and patterns."""
        o, k = self.shape
        out = torch.zeros(o, k, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.positions(), self.values)

    def with_values(self, values: torch.Tensor) -> "NMTensor":
        """Same pattern, new kept values (shares the index bytes)."""
        t = NMTensor(values, self.indices, self.n, self.m, self.shape)
        t._dense_idx = self._dense_idx
        return t

    def to(self, dtype: torch.dtype) -> "NMTensor":
        return self.with_values(self.values.to(dtype))

    def __repr__(self) -> str:
        return (f"NMTensor({self.n}:{self.m}, shape={self.shape}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.2f} MiB)")

    # ------------------------------------------------------------ persistence
    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for a safetensors file (used by save and by model checkpoints)."""
        meta = {f"{prefix}format": FORMAT_NAME, f"{prefix}version": str(FORMAT_VERSION),
                f"{prefix}n": str(self.n), f"{prefix}m": str(self.m),
                f"{prefix}shape": json.dumps(list(self.shape)),
                f"{prefix}dtype": str(self.dtype).replace("torch.", "")}
        return {f"{prefix}values": self.values, f"{prefix}indices": self.indices}, meta

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, prefix: str = "", source: str = "state") -> "NMTensor":
        try:
            if meta.get(f"{prefix}format") != FORMAT_NAME:
                raise ValueError(f"not a sparsewise N:M tensor (format={meta.get(prefix + 'format')!r})")
            version = int(meta[f"{prefix}version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"format version {version} is not supported (this sparsewise reads {FORMAT_VERSION})")
            n, m = int(meta[f"{prefix}n"]), int(meta[f"{prefix}m"])
            shape = tuple(json.loads(meta[f"{prefix}shape"]))
            dtype = _DTYPES[meta[f"{prefix}dtype"]]
            values, indices = tensors[f"{prefix}values"], tensors[f"{prefix}indices"]
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source}: damaged or foreign N:M metadata: {exc}") from None
        if values.dtype != dtype:
            raise ValueError(f"{source}: values are {values.dtype} but metadata says {dtype}")
        try:
            t = cls(values, indices, n, m, shape)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: metadata does not match the stored tensors: {exc}") from None
        local = _unpack_bits(t.indices, t.values.shape[1], index_bits(m)).reshape(shape[0], -1, n)
        if (local >= m).any() or (n > 1 and (local[..., 1:] <= local[..., :-1]).any()):
            raise ValueError(f"{source}: corrupted indices (positions out of range or not increasing)")
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a safetensors file atomically (temp file + fsync + rename)."""
        from safetensors.torch import save_file

        tensors, meta = self.state()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NMTensor":
        """Read a file written by :meth:`save`; a truncated or corrupted file raises ValueError."""
        tensors, meta = _read_safetensors(path)
        return cls.from_state(tensors, meta, source=str(path))


def _read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers/data
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from None
    return tensors, meta
