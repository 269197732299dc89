"""Embedding engine (the memory-bound zeros): multi-table jagged lookups, quantized rows, and the
optimizer fused into the backward pass, on the CPU.

>>> from sparsewise.embedding import EmbeddingBagCollection, TableConfig, KeyedJagged, Adagrad
>>> ebc = EmbeddingBagCollection([TableConfig("t", num_rows=10, dim=4)], optimizer=Adagrad(lr=0.1))
>>> ebc(KeyedJagged.from_lists({"t": [[1, 2], []]})).values.shape
torch.Size([2, 4])
"""
from .collection import EmbeddingBagCollection, PooledEmbeddings
from .config import SGD, Adagrad, Adam, RowwiseAdagrad, TableConfig
from .jagged import KeyedJagged

__all__ = ["KeyedJagged", "TableConfig", "EmbeddingBagCollection", "PooledEmbeddings", "SGD", "Adagrad",
           "RowwiseAdagrad", "Adam"]
