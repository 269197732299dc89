"""N:M (2:4) sparse weights: masks, packed format, CPU kernels, SparseLinear, sparsify_.

>>> import torch, torch.nn as nn
>>> from sparsewise.nm import SparseLinear, sparsify_, NMConfig
>>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
>>> print(sparsify_(model, NMConfig(n=2, m=4)))
swapped 2 layer(s), skipped 0
"""
from .functional import nm_linear
from .linear import NMConfig, SparseLinear, SparsifyReport, crossover_batch, kernel_batches, sparsify_
from .mask import check_nm, is_nm, nm_mask
from .prune import PruneReport, prune_
from .evaluate import accuracy, perplexity
from .finetune import FinetuneConfig, finetune_causal_lm, finetune_classifier
from .tensor import NMTensor

__all__ = ["nm_mask", "is_nm", "check_nm", "NMTensor", "nm_linear", "NMConfig", "SparseLinear",
           "sparsify_", "SparsifyReport", "crossover_batch", "kernel_batches", "prune_", "PruneReport",
           "perplexity", "accuracy", "FinetuneConfig", "finetune_classifier", "finetune_causal_lm"]
