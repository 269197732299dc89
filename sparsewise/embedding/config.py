"""Configs of the embedding engine: one frozen dataclass per table and per fused optimizer.

>>> TableConfig("t_user", num_rows=1000, dim=16, features=("user_id",))
TableConfig(name='t_user', num_rows=1000, dim=16, features=('user_id',), pooling='sum', dtype='fp32', init='uniform', seed=0)
>>> RowwiseAdagrad(lr=0.05)
RowwiseAdagrad(lr=0.05, eps=1e-08)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

__all__ = ["TableConfig", "SGD", "Adagrad", "RowwiseAdagrad", "Adam", "Optimizer", "POOLINGS", "DTYPES",
           "row_bytes"]

POOLINGS = ("sum", "mean", "max")
DTYPES = ("fp32", "bf16", "fp16", "int8")
INITS = ("uniform", "normal", "zeros")


def _positive_int(owner: str, field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{field} must be a positive integer, got {value!r}")


def _positive_float(owner: str, field: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{field} must be a finite number {want}, got {value!r}")


def _check_lr_eps(opt) -> None:
    _positive_float(type(opt).__name__, "lr", opt.lr)
    _positive_float(type(opt).__name__, "eps", opt.eps, allow_zero=True)


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored row: int8 rows carry an fp32 scale and bias after the values
    (padded so that they are 4-byte aligned)."""
    if dtype == "fp32":
        return 4 * dim
    if dtype in ("bf16", "fp16"):
        return 2 * dim
    if dtype == "int8":
        return (dim + 3) // 4 * 4 + 8
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")


@dataclass(frozen=True)
class TableConfig:
    """One embedding table. Several features (keys of the input batch) may share it.

    ``pooling`` combines the rows of one bag: "sum", "mean" (sum / number of ids) or "max".
    ``dtype`` is how rows are stored: "fp32" (trainable), "bf16"/"fp16" (half the bytes), "int8"
    (row-wise: one fp32 scale and bias per row). ``init`` is "uniform" (U(-1/sqrt(num_rows),
    +1/sqrt(num_rows)), TorchRec's default), "normal" (N(0, 1/dim)), "zeros", or a callable that
    fills an fp32 ``(num_rows, dim)`` tensor in place.
    """

    name: str
    num_rows: int
    dim: int
    features: tuple[str, ...] = ()
    pooling: str = "sum"
    dtype: str = "fp32"
    init: Union[str, Callable] = "uniform"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"TableConfig.name must be a Python identifier (it names the table's state), got {self.name!r}")
        _positive_int("TableConfig", "num_rows", self.num_rows)
        _positive_int("TableConfig", "dim", self.dim)
        feats = self.features
        if isinstance(feats, str):
            feats = (feats,)
        feats = tuple(feats) if feats else (self.name,)
        if not all(isinstance(f, str) and f for f in feats):
            raise ValueError(f"TableConfig.features must be non-empty strings, got {feats!r}")
        if len(set(feats)) != len(feats):
            raise ValueError(f"TableConfig.features lists a feature twice: {feats!r}")
        object.__setattr__(self, "features", feats)
        if self.pooling not in POOLINGS:
            raise ValueError(f"TableConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TableConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not callable(self.init) and self.init not in INITS:
            raise ValueError(f"TableConfig.init must be one of {INITS} or a callable, got {self.init!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"TableConfig.seed must be an integer, got {self.seed!r}")

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dim, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes


# ---------------------------------------------------------------------- fused optimizers
# Each is applied inside the backward pass to the rows a batch touched (deduplicated), in place.
# ``kind`` is the code the fused kernel switches on; ``states`` names the per-table state tensors
# and their shape ("row": (num_rows,), "elem": (num_rows, dim)).

@dataclass(frozen=True)
class SGD:
    """w <- w - lr * g"""

    lr: float = 0.01
    kind = 0
    states = ()

    def __post_init__(self):
        _positive_float(type(self).__name__, "lr", self.lr)


@dataclass(frozen=True)
class Adagrad:
    """Element-wise Adagrad (torch.optim.Adagrad semantics): s <- s + g^2; w <- w - lr * g / (sqrt(s) + eps)."""

    lr: float = 0.01
    eps: float = 1e-10
    kind = 1
    states = (("sum", "elem"),)

    def __post_init__(self):
        _check_lr_eps(self)


@dataclass(frozen=True)
class RowwiseAdagrad:
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one state per row,
    s <- s + mean(g^2); w <- w - lr * g / (sqrt(s) + eps). D times less optimizer state."""

    lr: float = 0.01
    eps: float = 1e-8
    kind = 2
    states = (("sum", "row"),)

    def __post_init__(self):
        _check_lr_eps(self)


@dataclass(frozen=True)
class Adam:
    """Lazy Adam (torch.optim.SparseAdam semantics): only the rows a batch touches update their
    moments; bias correction uses the collection's global step count."""

    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    kind = 3
    states = (("exp_avg", "elem"), ("exp_avg_sq", "elem"))

    def __post_init__(self):
        _positive_float("Adam", "lr", self.lr)
        _positive_float("Adam", "eps", self.eps, allow_zero=True)
        b = tuple(self.betas)
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in b):
            raise ValueError(f"Adam.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(b[0]), float(b[1])))


Optimizer = Union[SGD, Adagrad, RowwiseAdagrad, Adam]
OPTIMIZERS = (SGD, Adagrad, RowwiseAdagrad, Adam)
