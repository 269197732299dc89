"""Small helpers shared by every part of sparsewise: threads, atomic writes, validation.

Kept in one module on purpose (DESIGN.md): kernels and modules import from here instead of
growing private copies.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "check_writable_dir",
    "num_threads",
    "threads",
    "cache_dir",
    "cached_measurement",
]

_measure_lock = threading.Lock()


def cache_dir() -> Path:
    """Where sparsewise keeps machine-specific caches (probe results, measured crossovers).

    ``$SPARSEWISE_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/sparsewise`` or ``~/.cache/sparsewise``.
    """
    env = os.environ.get("SPARSEWISE_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "sparsewise"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    A crash or an exception inside the block leaves any existing file at ``path`` untouched.

    >>> with atomic_path("/tmp/x.bin") as tmp:          # doctest: +SKIP
    ...     tmp.write_bytes(b"data")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in results; everything else is a bug worth seeing
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written there.

    Raises ``PermissionError``/``NotADirectoryError`` with a message naming the path, so a CLI can
    refuse an unwritable ``--out`` before doing minutes of work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write to {path}: {exc.strerror or exc}") from None
    return path


def num_threads(requested: int | None = None) -> int:
    """Threads a kernel should use: ``requested`` if given, else ``torch.get_num_threads()``."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested!r}")
        return requested
    import torch

    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` threads in torch and numba, restoring both afterwards.

    ``n=None`` keeps the current torch setting (and matches numba to it).
    """
    import numba
    import torch

    old_torch = torch.get_num_threads()
    old_numba = numba.get_num_threads()
    want = num_threads(n) if n is not None else old_torch
    want_numba = min(want, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(want)
    numba.set_num_threads(want_numba)
    try:
        yield want
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)


def cached_measurement(filename: str, key: str, measure: Callable[[], int], *, refresh: bool = False) -> int:
    """An integer measured once per machine and setting (e.g. a dispatch crossover), kept in
    ``cache_dir()/filename`` under ``key``. A missing or damaged file means measure again; a
    cache that cannot be written only costs a re-measurement next time."""
    path = cache_dir() / filename
    with _measure_lock:
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        if not refresh and isinstance(table.get(key), int):
            return table[key]
        value = int(measure())
        table[key] = value
        try:
            atomic_write_json(path, table)
        except OSError:
            pass
        return value
