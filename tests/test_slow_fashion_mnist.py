"""Train, prune 2:4, fine-tune on the real Fashion-MNIST (slow; needs `make data`)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsewise.data import FASHION_MNIST_DIR
from sparsewise.nm import is_nm, prune_, sparsify_
from sparsewise.nm.finetune import FinetuneConfig, finetune_classifier

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (make data)")]


def _batches(x, y, gen, bs=128):
    perm = torch.randperm(x.shape[0], generator=gen)
    return [(x[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(0, x.shape[0], bs)]


@torch.no_grad()
def _acc(model, x, y):
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean()) * 100


def test_prune_and_finetune_stay_within_one_point_of_dense():
    from sparsewise.data import load_fashion_mnist

    torch.manual_seed(0)
    d = load_fashion_mnist()
    gen = torch.Generator().manual_seed(0)
    dense = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(dense.parameters(), lr=1e-3)
    for _ in range(2):
        dense.train()
        for xb, yb in _batches(d["train_x"], d["train_y"], gen):
            opt.zero_grad()
            F.cross_entropy(dense(xb), yb).backward()
            opt.step()
    dense_acc = _acc(dense, d["test_x"], d["test_y"])
    assert dense_acc > 84
    model = copy.deepcopy(dense)
    calib = [xb for xb, _ in _batches(d["train_x"][:2048], d["train_y"][:2048], gen)]
    prune_(model, "sparsegpt", 2, 4, calibration=calib, progress=False)
    one_shot = _acc(model, d["test_x"], d["test_y"])
    finetune_classifier(model, _batches(d["train_x"], d["train_y"], gen),
                        FinetuneConfig(mode="masked", lr=2e-4, epochs=1, distill_alpha=0.5), teacher=dense,
                        progress=False)
    tuned = _acc(model, d["test_x"], d["test_y"])
    assert all(is_nm(m.weight, 2, 4) for m in model if isinstance(m, nn.Linear))
    assert tuned >= one_shot - 0.5
    assert dense_acc - tuned <= 1.0, (dense_acc, one_shot, tuned)
    packed = copy.deepcopy(model)
    sparsify_(packed)
    assert abs(_acc(packed, d["test_x"], d["test_y"]) - tuned) < 0.05
