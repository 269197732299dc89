"""The optional benchmark peers (`make peers`): TorchRec 1.8.0 on the CPU build of FBGEMM."""
import importlib.metadata as md
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchrec") is None,
                                reason="peers not installed (make peers)")


def _installed(name):
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def test_cpu_fbgemm_only_and_torch_kept():
    import torch

    assert md.version("torchrec") == "1.8.0"
    assert _installed("fbgemm-gpu-cpu") and not _installed("fbgemm-gpu")
    assert torch.__version__.startswith("2.13.0")


def test_torchrec_embedding_bag_collection_runs_on_cpu():
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100,
                                                            feature_names=["f0"])], device=torch.device("cpu"))
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 0, 2]))
    out = ebc(kjt).to_dict()["f0"]
    assert out.shape == (3, 8)
    assert torch.equal(out[1], torch.zeros(8))  # the empty bag pools to zeros
