"""nm_mask / is_nm / check_nm: property tests against a plain sort, and bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from sparsewise.nm import check_nm, is_nm, nm_mask

PROPS = settings(max_examples=30, deadline=None)


@st.composite
def patterns(draw):
    m = draw(st.integers(2, 16))
    n = draw(st.integers(1, m - 1))
    return n, m


@st.composite
def score_cases(draw, elements=None, allow_infinity=True):
    n, m = draw(patterns())
    rows = draw(st.integers(1, 7))
    groups = draw(st.integers(1, 6))
    if elements is None:
        elements = st.floats(width=32, allow_nan=False, allow_infinity=allow_infinity)
    scores = draw(arrays(np.float32, (rows, groups * m), elements=elements))
    return n, m, torch.from_numpy(scores)


def expected_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Oracle: per group, sort positions by (score descending, position ascending), keep n."""
    rows, k = scores.shape
    out = torch.zeros(rows, k, dtype=torch.bool)
    s = scores.tolist()
    for r in range(rows):
        for g0 in range(0, k, m):
            order = sorted(range(m), key=lambda j: (-s[r][g0 + j], j))
            for j in order[:n]:
                out[r, g0 + j] = True
    return out


# ------------------------------------------------------------------ properties

@PROPS
@given(score_cases())
def test_mask_keeps_exactly_n_per_group_and_the_n_largest(case):
    n, m, scores = case
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    per_group = mask.reshape(scores.shape[0], -1, m).sum(-1)
    assert bool((per_group == n).all())
    assert torch.equal(mask, expected_mask(scores, n, m))
    # every kept score is >= every dropped score of the same group
    g = scores.reshape(scores.shape[0], -1, m).double()
    gm = mask.reshape(g.shape)
    kept_min = torch.where(gm, g, torch.full_like(g, math.inf)).amin(-1)
    drop_max = torch.where(~gm, g, torch.full_like(g, -math.inf)).amax(-1)
    assert bool((kept_min >= drop_max).all())


@PROPS
@given(score_cases(elements=st.sampled_from([-1.0, 0.0, -0.0, 0.5, 2.0])))
def test_ties_go_to_the_lower_position(case):
    n, m, scores = case
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, expected_mask(scores, n, m))


@PROPS
@given(score_cases(allow_infinity=False))
def test_pruned_weight_is_nm(case):
    n, m, w = case
    mask = nm_mask(w.abs(), n, m)
    pruned = w * mask
    assert is_nm(pruned, n, m)
    # and a weight with more than n non-zeros in a group is not N:M
    dense = torch.ones_like(w)
    assert not is_nm(dense, n, m)


@PROPS
@given(patterns(), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_mask_on_leading_dims_and_integer_scores(pattern, rows, groups, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (2, rows, groups * m), generator=gen)
    mask = nm_mask(s, n, m)
    assert mask.shape == s.shape
    assert torch.equal(mask.reshape(2 * rows, -1), expected_mask(s.reshape(2 * rows, -1), n, m))


def test_mask_examples():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    assert nm_mask(w.abs(), 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm_mask(w.abs(), 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]
    # -inf ranks last, +inf first
    s = torch.tensor([[-math.inf, 0.0, math.inf, -1.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, True, False]]


def test_is_nm_counts_nonzeros():
    assert is_nm(torch.tensor([[0.0, 1.0, 2.0, 0.0]]), 2, 4)
    assert is_nm(torch.zeros(3, 8), 2, 4)  # fewer than n is fine
    assert not is_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 4)
    assert not is_nm(torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]), 2, 4)
    assert not is_nm(torch.ones(2, 6), 2, 4)  # last dim not divisible by m
    assert not is_nm(torch.tensor(1.0), 2, 4)  # 0-d
    assert is_nm(torch.tensor([True, False, False, True]), 2, 4)
    # NaN is a non-zero
    assert not is_nm(torch.tensor([[math.nan, 1.0, 1.0, 0.0]]), 2, 4)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 4), (1, 17), (16, 16), (1, 1), (0, 0)])
def test_check_nm_rejects_bad_patterns(n, m):
    with pytest.raises(ValueError, match="0 < n < m <= 16"):
        check_nm(n, m)
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, 16 * 17), n, m)
    with pytest.raises(ValueError):
        is_nm(torch.ones(2, 16 * 17), n, m)


@pytest.mark.parametrize("n,m", [(2.0, 4), (2, 4.0), ("2", 4), (True, 4), (1, None), (np.float32(2), 4)])
def test_check_nm_rejects_non_int(n, m):
    with pytest.raises(TypeError):
        check_nm(n, m)
    with pytest.raises(TypeError):
        nm_mask(torch.ones(1, 16), n, m)


def test_check_nm_accepts_and_returns_ints():
    assert check_nm(2, 4) == (2, 4)
    assert check_nm(15, 16) == (15, 16)
    assert check_nm(1, 2) == (1, 2)


@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_mask_last_dim_not_divisible(k):
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nm_mask(torch.ones(3, k), 2, 4)


def test_mask_rejects_nan_scores():
    s = torch.ones(2, 8)
    s[1, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(s, 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(s.to(torch.bfloat16), 2, 4)


def test_mask_rejects_non_tensor_and_bad_dtypes():
    with pytest.raises(TypeError):
        nm_mask([[1.0, 2.0, 3.0, 4.0]], 2, 4)
    with pytest.raises(TypeError):
        nm_mask(torch.ones(1, 4, dtype=torch.bool), 2, 4)
    with pytest.raises(TypeError):
        nm_mask(torch.ones(1, 4, dtype=torch.complex64), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.tensor(1.0), 2, 4)
    with pytest.raises(TypeError):
        is_nm([[0.0, 1.0, 0.0, 0.0]], 2, 4)
