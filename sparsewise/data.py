"""Real data sets that ship in packages (no downloads at run time).

- Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (``make data`` installs it).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path(os.environ.get("SPARSEWISE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, OSError) as exc:  # truncated or not gzip at all
        raise ValueError(f"{path}: unreadable gzip data (truncated or corrupted?): {exc}") from None
    if len(raw) < 4 + 4 * dims or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path}: not an IDX file with magic {magic:#x} (corrupted?)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({data.size} bytes of {int(np.prod(shape))})")
    return data.reshape(shape)


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Fashion-MNIST as tensors: train_x (60000, 784) float32 in [0, 1], train_y (60000,) int64,
    test_x (10000, 784), test_y (10000,).

    >>> d = load_fashion_mnist()          # doctest: +SKIP
    >>> d["train_x"].shape
    torch.Size([60000, 784])
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
                                "install the Debian package dataset-fashion-mnist (`make data`)")
    out = {}
    for key, name in files.items():
        if key.endswith("_x"):
            arr = _read_idx(root / name, 0x803, 3)
            out[key] = torch.from_numpy(arr.reshape(arr.shape[0], -1).astype(np.float32) / 255.0)
        else:
            out[key] = torch.from_numpy(_read_idx(root / name, 0x801, 1).astype(np.int64))
    for split in ("train", "test"):
        if out[f"{split}_x"].shape[0] != out[f"{split}_y"].shape[0]:
            raise ValueError(f"{root}: {split} images ({out[split + '_x'].shape[0]}) and labels "
                             f"({out[split + '_y'].shape[0]}) differ in count")
    return out
