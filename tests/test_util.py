import subprocess
import sys

import pytest

from sparsewise._util import atomic_write_text, atomic_path, check_writable_dir, num_threads, threads


def test_atomic_write_replaces_and_failed_write_keeps_old(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind
    atomic_write_text(p, "new")
    assert p.read_text() == "new"


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        check_writable_dir(f)
    with pytest.raises(PermissionError):
        check_writable_dir("/proc/not-here")


def test_threads_context_restores():
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    with threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with pytest.raises(ValueError):
        num_threads(0)


def test_import_is_lazy():
    code = "import sys, sparsewise; print(any(m in sys.modules for m in ('torch', 'numba')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
