"""Where dataset files are looked for, in order, and where downloads and decoded caches go.

Order: `--data-dir`, then $CNNLAB_DATA, then the per-user cache (platformdirs: ~/.cache/cnnlab/data on Linux),
then system locations that distribution packages install to (Debian's dataset-fashion-mnist, found with dpkg -L).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import platformdirs

DATA_ENV = "CNNLAB_DATA"  # a directory holding datasets, one sub-folder each
CACHE_ENV = "CNNLAB_CACHE"  # overrides the per-user cache root (downloads and decoded image folders)


def cache_root() -> Path:
    """The per-user cache root: $CNNLAB_CACHE, else platformdirs' user cache dir for cnnlab."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else platformdirs.user_cache_path("cnnlab")


def download_root() -> Path:
    """Where downloads land (torchvision's own layout below it, e.g. FashionMNIST/raw/)."""
    return cache_root() / "data"


@dataclass(frozen=True)
class SearchRoot:
    """One place to look, and why it is on the list (for the error message)."""

    path: Path
    origin: str  # {data_dir} (an option mention, see errors.CnnlabError), $CNNLAB_DATA, user cache, system
    flat: bool = False  # the dataset's files may sit directly in it (an explicit --data-dir, a package's folder)


def search_roots(data_dir: str | os.PathLike[str] | None, system: tuple[Path, ...] = ()) -> list[SearchRoot]:
    """The directories to look in, in priority order."""
    roots = []
    if data_dir:
        roots.append(SearchRoot(Path(data_dir).expanduser(), "{data_dir}", flat=True))
    if os.environ.get(DATA_ENV):
        roots.append(SearchRoot(Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"))
    roots.append(SearchRoot(download_root(), "user cache"))
    roots += [SearchRoot(p, "system", flat=True) for p in system]
    return roots


@functools.cache
def dpkg_dirs(package: str) -> tuple[Path, ...]:
    """Directories holding files of an installed Debian package (empty where dpkg or the package is absent)."""
    if shutil.which("dpkg") is None:
        return ()
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    dirs = {Path(line).parent for line in out.stdout.splitlines() if line.strip() and Path(line).is_file()}
    return tuple(sorted(dirs))


def find_files(roots: list[SearchRoot], subdirs: tuple[str, ...], names: tuple[str, ...]) -> dict[str, Path] | None:
    """The first directory (root/subdir, or root itself where flat) holding all `names`, plain or .gz."""
    for root in roots:
        candidates = [root.path / s for s in subdirs] + ([root.path] if root.flat else [])
        for d in candidates:
            found = {}
            for n in names:
                for variant in (n, n + ".gz"):
                    if (d / variant).is_file():
                        found[n] = d / variant
                        break
            if len(found) == len(names):
                return found
    return None


def describe_roots(roots: list[SearchRoot]) -> str:
    """'--data-dir x, $CNNLAB_DATA y, user cache z' for error messages."""
    return ", ".join(f"{r.origin} {r.path}" for r in roots)
