import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsewise.nm.evaluate import accuracy, perplexity


class Bigram(nn.Module):
    """Logits depend only on the current token: perplexity must not depend on window or stride."""

    def __init__(self, v=11):
        super().__init__()
        self.table = nn.Parameter(torch.randn(v, v, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.table[x]


def _direct(model, ids):
    logits = model(ids.unsqueeze(0))[0]
    return math.exp(float(F.cross_entropy(logits[:-1], ids[1:])))


@pytest.mark.parametrize("window, stride", [(8, 3), (16, 5), (8, 7), (101, 1), (101, 101), (30, 29)])
def test_every_token_scored_once(window, stride):
    ids = torch.randint(0, 11, (101,), generator=torch.Generator().manual_seed(1))
    model = Bigram()
    assert perplexity(model, ids, window=window, stride=stride) == pytest.approx(_direct(model, ids), rel=1e-5)


def test_non_overlapping_windows_skip_each_window_first_token():
    ids = torch.randint(0, 11, (96,), generator=torch.Generator().manual_seed(2))
    model = Bigram()
    logits = model(ids.unsqueeze(0))[0]
    keep = torch.tensor([p % 8 != 0 for p in range(1, 96)])  # targets 1..95; 8, 16, ... start a window
    expected = math.exp(float(F.cross_entropy(logits[:-1][keep], ids[1:][keep])))
    assert perplexity(model, ids, window=8, stride=8) == pytest.approx(expected, rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size():
    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(1, x.shape[-1], 7)

    assert perplexity(Uniform(), torch.arange(50) % 7, window=10, stride=4) == pytest.approx(7.0)


def test_accepts_2d_ids_and_restores_mode():
    model = Bigram().train()
    ids = torch.randint(0, 11, (1, 40))
    perplexity(model, ids, window=10, stride=5)
    assert model.training


@pytest.mark.parametrize("kwargs, err", [
    (dict(window=64, stride=32), ValueError),   # text shorter than one window
    (dict(window=1, stride=1), ValueError),
    (dict(window=8, stride=0), ValueError),
    (dict(window=8, stride=9), ValueError),
])
def test_bad_settings(kwargs, err):
    with pytest.raises(err):
        perplexity(Bigram(), torch.randint(0, 11, (40,)), **kwargs)


def test_bad_ids_and_non_finite_logits():
    with pytest.raises(TypeError):
        perplexity(Bigram(), torch.rand(40), window=8, stride=4)

    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((1, x.shape[-1], 5), float("nan"))

    with pytest.raises(ValueError, match="non-finite"):
        perplexity(Broken(), torch.randint(0, 5, (20,)), window=8, stride=4)


def test_accuracy():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.eye(3)
    assert accuracy(model, [(x, torch.tensor([0, 1, 2]))]) == 100.0
    assert accuracy(model, [(x, torch.tensor([0, 0, 0]))]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        accuracy(model, [])
