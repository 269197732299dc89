"""sparsewise: turn every kind of zero in a model into real speed on the hardware at hand.

Public names are imported lazily: ``import sparsewise`` compiles no kernel and touches no GPU.

>>> import sparsewise
>>> sparsewise.__version__
'0.1.0'
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access
_LAZY = {
    "probe": "sparsewise.advisor.probe",
    "machine_info": "sparsewise.advisor.probe",
    "compare": "sparsewise.bench",
    "PairedResult": "sparsewise.bench",
}
_SUBPACKAGES = {"nm", "embedding", "moe", "advisor", "bench", "cli"}

__all__ = sorted(_LAZY) + sorted(_SUBPACKAGES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sparsewise.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsewise' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
