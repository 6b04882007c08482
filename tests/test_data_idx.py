"""IDX reading and in-memory datasets, on the real Fashion-MNIST / MNIST files."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsparse.data import IdxFormatError, InMemoryDataset, load_dataset, read_idx
from fedsparse.data.idx import parse

SHARED = Path(os.environ.get("FEDSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason=f"no datasets at {SHARED}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDSPARSE_DATA", str(SHARED))


@needs_data
def test_fashion_mnist_decodes_with_expected_counts_and_stats() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.dtype == torch.int64
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    pixels = ds.train_images.to(torch.float64) / 255
    assert pixels.mean().item() == pytest.approx(ds.mean[0], abs=5e-4) == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(ds.std[0], abs=5e-4)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)


@needs_data
def test_mnist_decodes_with_expected_counts_and_stats() -> None:
    ds = load_dataset("mnist")
    assert torch.bincount(ds.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert len(ds.test_labels) == 10000
    pixels = ds.train_images.to(torch.float64) / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=5e-4) == pytest.approx(ds.mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=5e-4) == pytest.approx(ds.std[0], abs=5e-4)


@needs_data
def test_load_is_cached_per_folder_and_normalize_is_on_the_fly() -> None:
    a, b = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", SHARED)
    assert a is b
    batch = a.normalize(a.train_images[:2000])
    assert batch.dtype == torch.float32 and batch.shape == (2000, 1, 28, 28)
    assert abs(batch.mean().item()) < 0.05 and abs(batch.std().item() - 1) < 0.05
    assert a.normalize(a.train_images[0]).shape == (1, 28, 28)
    with pytest.raises(TypeError, match="uint8"):
        a.normalize(batch)


@needs_data
def test_raw_and_gzip_files_decode_identically(tmp_path: Path) -> None:
    src = SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(src.read_bytes()))
    np.testing.assert_array_equal(read_idx(src), read_idx(raw))


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_round_trip_and_corruption_errors(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(arr)
    out = parse(data)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable
    with pytest.raises(IdxFormatError, match="magic"):
        parse(b"\x00\x00\x07\x03" + data[4:])
    with pytest.raises(IdxFormatError, match="size mismatch"):
        parse(data[:-1])
    with pytest.raises(IdxFormatError, match="size mismatch"):
        parse(data + b"\x00")
    with pytest.raises(IdxFormatError, match="too short"):
        parse(b"\x00\x00")
    bad_gz = bytearray(gzip.compress(data))
    bad_gz[len(bad_gz) // 2] ^= 0xFF
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(bytes(bad_gz))
    with pytest.raises(IdxFormatError, match=str(path)):
        read_idx(path)


def test_truncated_dataset_file_gives_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 255, (n, 28, 28))))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(rng.integers(0, 10, n)))
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_labels.shape == (5,)
    bad = tmp_path / "bad"
    (bad / "mnist").mkdir(parents=True)
    for f in folder.iterdir():
        (bad / "mnist" / f.name).write_bytes(f.read_bytes())
    p = bad / "mnist" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(IdxFormatError, match="train-images-idx3-ubyte: size mismatch"):
        load_dataset("mnist", bad)


def test_cifar10_pickle_layout_is_read(tmp_path: Path) -> None:
    """A miniature CIFAR-10 in torchvision's layout (the real one is not available offline)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        expected.append((data, labels))
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, fh)
    ds = load_dataset("cifar10", tmp_path)
    assert isinstance(ds, InMemoryDataset)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 32, 10)
    # channel-major rows: the first 1024 values are the red plane
    np.testing.assert_array_equal(ds.train_images[0, 0].numpy().ravel(), expected[0][0][0, :1024])
    assert ds.test_labels.tolist() == expected[-1][1]
    assert ds.normalize(ds.test_images).shape == (4, 3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                    "fine_labels": [99, 0, 57],
                    "coarse_labels": [19, 0, 3],
                },
                fh,
            )
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train_labels.tolist() == [99, 0, 57]


class _Payload:
    """A pickle that runs code when loaded (what a hostile data folder could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batches_cannot_run_code(tmp_path: Path) -> None:
    """CIFAR batches are read with an unpickler that admits numpy arrays, lists, dicts and strings
    only: a batch whose pickle would call os.system is refused, and nothing runs."""
    from fedsparse.data import inmemory

    inmemory.clear_cache()
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    good = {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [1], "coarse_labels": [0]}
    with open(folder / "train", "wb") as fh:
        pickle.dump({**good, "extra": _Payload(marker)}, fh)
    with open(folder / "test", "wb") as fh:
        pickle.dump(good, fh)
    with pytest.raises(ValueError, match=r"not a readable cifar100 pickle batch.*refusing to load posix\.system"):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()
