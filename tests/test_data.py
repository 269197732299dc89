"""sparsewise.data.load_fashion_mnist on tiny fake IDX files (plus one slow test on the real set)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsewise.data import FASHION_MNIST_DIR, load_fashion_mnist

FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
         "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}


def idx_images(images: np.ndarray, magic: int = 0x803) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 0x801) -> bytes:
    return struct.pack(">II", magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(raw)


@pytest.fixture
def fake(tmp_path):
    """A fake Fashion-MNIST folder: 5 training and 3 test images, every pixel value distinct per image."""
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "train_y": np.array([0, 9, 3, 3, 7], dtype=np.uint8),
              "test_x": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "test_y": np.array([1, 2, 9], dtype=np.uint8)}
    arrays["train_x"][0, 0, 0], arrays["train_x"][0, 0, 1], arrays["train_x"][0, 0, 2] = 0, 255, 51
    for key, name in FILES.items():
        write_gz(tmp_path / name, idx_images(arrays[key]) if key.endswith("_x") else idx_labels(arrays[key]))
    return tmp_path, arrays


def test_loads_shapes_dtypes_and_scaling(fake):
    root, arrays = fake
    d = load_fashion_mnist(root)
    assert set(d) == set(FILES)
    assert d["train_x"].shape == (5, 784) and d["test_x"].shape == (3, 784)
    assert d["train_y"].shape == (5,) and d["test_y"].shape == (3,)
    assert d["train_x"].dtype == torch.float32 and d["test_x"].dtype == torch.float32
    assert d["train_y"].dtype == torch.int64 and d["test_y"].dtype == torch.int64
    for key in ("train_x", "test_x"):
        x = d[key]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        # row-major: image i, row r, column c -> feature r * 28 + c
        expected = torch.from_numpy(arrays[key].reshape(arrays[key].shape[0], -1).astype(np.float32) / 255.0)
        assert torch.equal(x, expected)
    assert d["train_x"][0, 0] == 0.0 and d["train_x"][0, 1] == 1.0
    assert d["train_x"][0, 2] == pytest.approx(0.2)
    assert d["train_y"].tolist() == [0, 9, 3, 3, 7] and d["test_y"].tolist() == [1, 2, 9]


def test_root_may_be_a_string(fake):
    root, _ = fake
    assert load_fashion_mnist(str(root))["test_x"].shape == (3, 784)


def test_default_root_is_the_debian_package_folder():
    assert FASHION_MNIST_DIR == Path(__import__("os").environ.get("SPARSEWISE_FASHION_MNIST",
                                                                  "/usr/share/datasets/fashion-mnist"))


@pytest.mark.parametrize("remove", list(FILES.values()))
def test_missing_file_points_to_the_package(fake, remove):
    root, _ = fake
    (root / remove).unlink()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as exc:
        load_fashion_mnist(root)
    assert remove in str(exc.value)


def test_empty_folder_lists_every_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as exc:
        load_fashion_mnist(tmp_path / "does-not-exist")
    assert all(name in str(exc.value) for name in FILES.values())


def test_bad_magic_in_images(fake):
    root, arrays = fake
    write_gz(root / FILES["train_x"], idx_images(arrays["train_x"], magic=0x801))
    with pytest.raises(ValueError, match="magic") as exc:
        load_fashion_mnist(root)
    assert FILES["train_x"] in str(exc.value)


def test_bad_magic_in_labels(fake):
    root, arrays = fake
    write_gz(root / FILES["test_y"], idx_labels(arrays["test_y"], magic=0x803))
    with pytest.raises(ValueError, match="magic") as exc:
        load_fashion_mnist(root)
    assert FILES["test_y"] in str(exc.value)


def test_header_shorter_than_its_dimensions(fake):
    root, _ = fake
    write_gz(root / FILES["test_x"], struct.pack(">II", 0x803, 3))  # only one of three dims
    with pytest.raises(ValueError, match="IDX"):
        load_fashion_mnist(root)


def test_truncated_images(fake):
    root, arrays = fake
    raw = idx_images(arrays["train_x"])
    write_gz(root / FILES["train_x"], raw[:-100])
    with pytest.raises(ValueError, match="truncated") as exc:
        load_fashion_mnist(root)
    assert FILES["train_x"] in str(exc.value)


def test_truncated_labels(fake):
    root, arrays = fake
    write_gz(root / FILES["train_y"], idx_labels(arrays["train_y"])[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(root)


def test_header_claims_fewer_images_than_stored(fake):
    root, arrays = fake
    raw = bytearray(idx_images(arrays["test_x"]))
    raw[4:8] = struct.pack(">I", 2)  # header says 2 images, 3 are stored
    write_gz(root / FILES["test_x"], bytes(raw))
    with pytest.raises(ValueError):
        load_fashion_mnist(root)


def test_truncated_gzip_stream(fake):
    root, _ = fake
    path = root / FILES["train_x"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_fashion_mnist(root)


@pytest.mark.slow
@pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") / FILES["train_x"]).is_file(),
                    reason="Fashion-MNIST not installed (make data)")
def test_real_fashion_mnist():
    d = load_fashion_mnist("/usr/share/datasets/fashion-mnist")
    assert d["train_x"].shape == (60000, 784) and d["test_x"].shape == (10000, 784)
    assert d["train_y"].shape == (60000,) and d["test_y"].shape == (10000,)
    assert d["train_x"].dtype == torch.float32 and d["train_y"].dtype == torch.int64
    assert float(d["train_x"].min()) == 0.0 and float(d["train_x"].max()) == 1.0
    for key in ("train_y", "test_y"):
        assert sorted(d[key].unique().tolist()) == list(range(10))
    assert torch.bincount(d["train_y"]).tolist() == [6000] * 10
    assert torch.bincount(d["test_y"]).tolist() == [1000] * 10
