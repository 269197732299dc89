"""``KeyedJagged``: the ids of every sparse feature of a batch in one flat array.

Layout (TorchRec's KeyedJaggedTensor): F = number of keys (features), B = batch size,
``values`` (nnz,) int64 holds the ids feature-major (all bags of feature 0, then feature 1, ...),
``lengths`` (F*B,) the number of ids in each bag, ``offsets`` (F*B+1,) their running sum
(bag i is ``values[offsets[i]:offsets[i+1]]``), ``weights`` (nnz,) float32 optional per-id
weights. Either ``offsets`` or ``lengths`` is given; the other is derived on first use.

>>> kj = KeyedJagged.from_lists({"user": [[1], [2]], "genres": [[3, 4], []]})
>>> kj.batch_size, kj.lengths.tolist()
(2, [1, 1, 2, 0])
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["KeyedJagged"]

_INT_DTYPES = (torch.int64, torch.int32)


class KeyedJagged:
    """Ids of several features of one batch, jagged (each bag has its own length).

    Construction is cheap (no copy, no check); call :meth:`validate` to get a clear error for a
    malformed batch. :class:`~sparsewise.embedding.EmbeddingBagCollection` validates every batch
    before any kernel runs.
    """

    __slots__ = ("_keys", "_values", "_offsets", "_lengths", "_weights")

    def __init__(self, keys: Sequence[str], values: torch.Tensor, offsets: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        if isinstance(keys, str):
            raise TypeError("keys must be a sequence of feature names, not one string")
        self._keys = tuple(keys)
        if offsets is None and lengths is None:
            raise ValueError("KeyedJagged needs offsets or lengths")
        self._values = values
        self._offsets = offsets
        self._lengths = lengths
        self._weights = weights

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lists(cls, bags: Mapping[str, Sequence[Sequence[int]]],
                   weights: Mapping[str, Sequence[Sequence[float]]] | None = None) -> "KeyedJagged":
        """Build from ``{key: [[ids of sample 0], [ids of sample 1], ...]}`` (same batch size for every key)."""
        keys = list(bags)
        sizes = {len(bags[k]) for k in keys}
        if len(sizes) > 1:
            raise ValueError(f"every key needs the same batch size, got {{{', '.join(f'{k}: {len(bags[k])}' for k in keys)}}}")
        flat, lens, wflat = [], [], []
        for k in keys:
            for i, bag in enumerate(bags[k]):
                bag = list(bag)
                flat.extend(bag)
                lens.append(len(bag))
                if weights is not None:
                    w = list(weights[k][i])
                    if len(w) != len(bag):
                        raise ValueError(f"weights of key {k!r} sample {i} have {len(w)} entries for {len(bag)} ids")
                    wflat.extend(w)
        return cls(keys, torch.tensor(flat, dtype=torch.int64), lengths=torch.tensor(lens, dtype=torch.int64),
                   weights=torch.tensor(wflat, dtype=torch.float32) if weights is not None else None)

    @classmethod
    def from_dict(cls, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> "KeyedJagged":
        """Build from ``{key: (values, lengths)}`` tensors (one concatenation)."""
        keys = list(parts)
        if not keys:
            raise ValueError("from_dict needs at least one key")
        values = torch.cat([torch.as_tensor(parts[k][0]).reshape(-1).to(torch.int64) for k in keys])
        lengths = torch.cat([torch.as_tensor(parts[k][1]).reshape(-1).to(torch.int64) for k in keys])
        return cls(keys, values, lengths=lengths)

    # ------------------------------------------------------------------ views
    @property
    def keys(self) -> tuple[str, ...]:
        return self._keys

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @property
    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            lengths = self._lengths
            off = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths.to(torch.int64), 0, out=off[1:])
            self._offsets = off
        return self._offsets

    @property
    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = torch.diff(self._offsets.to(torch.int64))
        return self._lengths

    @property
    def batch_size(self) -> int:
        n = (self._lengths.numel() if self._lengths is not None else self._offsets.numel() - 1)
        return n // max(1, len(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, lengths)`` of one feature."""
        f = self._keys.index(key)
        B = self.batch_size
        off = self.offsets
        lo, hi = int(off[f * B]), int(off[(f + 1) * B])
        return self._values[lo:hi], self.lengths[f * B:(f + 1) * B]

    def to_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: self[k] for k in self._keys}

    def __repr__(self) -> str:
        return (f"KeyedJagged(keys={list(self._keys)}, batch_size={self.batch_size}, nnz={self._values.numel()}, "
                f"weighted={self._weights is not None})")

    # ------------------------------------------------------------------ checks
    def validate(self) -> "KeyedJagged":
        """Raise ``TypeError``/``ValueError`` saying exactly what is wrong; return self when fine."""
        keys, values = self._keys, self._values
        if not keys:
            raise ValueError("KeyedJagged has no keys")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate keys: {dup}")
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be strings, got {[type(k).__name__ for k in keys]}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype not in _INT_DTYPES:
            raise TypeError(f"values (ids) must be int64 or int32, got {values.dtype}")
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
        nnz = values.numel()
        F = len(keys)
        if self._lengths is not None:
            lengths = self._lengths
            if not isinstance(lengths, torch.Tensor) or lengths.dtype not in _INT_DTYPES or lengths.dim() != 1:
                raise TypeError(f"lengths must be a 1-D int64/int32 tensor, got {_describe(lengths)}")
            if lengths.numel() % F:
                raise ValueError(f"len(lengths)={lengths.numel()} is not a multiple of the {F} keys")
            if lengths.numel() and int(lengths.min()) < 0:
                i = int(torch.nonzero(lengths < 0)[0])
                raise ValueError(f"lengths[{i}] = {int(lengths[i])} is negative")
            total = int(lengths.sum())
            if total != nnz:
                raise ValueError(f"lengths sum to {total} but there are {nnz} values")
        if self._offsets is not None:
            off = self._offsets
            if not isinstance(off, torch.Tensor) or off.dtype not in _INT_DTYPES or off.dim() != 1:
                raise TypeError(f"offsets must be a 1-D int64/int32 tensor, got {_describe(off)}")
            if off.numel() < 1 or (off.numel() - 1) % F:
                raise ValueError(f"len(offsets)={off.numel()} must be F*B+1 for the {F} keys")
            if int(off[0]) != 0:
                raise ValueError(f"offsets[0] must be 0, got {int(off[0])}")
            if int(off[-1]) != nnz:
                raise ValueError(f"offsets[-1] = {int(off[-1])} but there are {nnz} values")
            d = torch.diff(off)
            if d.numel() and int(d.min()) < 0:
                i = int(torch.nonzero(d < 0)[0])
                raise ValueError(f"offsets are not monotone: offsets[{i}] = {int(off[i])} > offsets[{i + 1}] = {int(off[i + 1])}")
            if self._lengths is not None and not torch.equal(d, self._lengths.to(d.dtype)):
                raise ValueError("offsets and lengths disagree")
        if self._weights is not None:
            w = self._weights
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise TypeError(f"weights must be a floating-point tensor, got {_describe(w)}")
            if w.shape != (nnz,):
                raise ValueError(f"weights must have shape ({nnz},) like values, got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                i = int(torch.nonzero(~torch.isfinite(w))[0])
                raise ValueError(f"weights[{i}] = {float(w[i])} is not finite")
        for name, t in (("values", values), ("offsets", self._offsets), ("lengths", self._lengths), ("weights", self._weights)):
            if t is not None and t.device.type != "cpu":
                raise ValueError(f"{name} is on {t.device}; the embedding engine runs on the CPU")
        return self


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__

