"""Atomic writes: a file or a directory appears whole or not at all.

Everything tvm_lite caches or exports (ONNX exports, compiled artifacts, quantized weights, tuning
side files) is written under a temporary name in the same directory and renamed into place, so a
run stopped at any point (Ctrl-C, kill -9, a full disk) leaves either the previous entry or
nothing, never a half-written one: the next run rebuilds or reuses cleanly.

    with atomic_dir(out) as tmp:     # fill tmp/; renamed to out/ when the block ends normally
        ...
    atomic_write_text(path, text)    # temp file + fsync + os.replace
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

_TMP = ".tmp-"  # the marker of a temporary sibling: ".<name>.tmp-<pid>-<random>"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by runs that were killed (their process is
    gone); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.exists():
        return removed
    for tmp in path.parent.glob(f".{path.name}{_TMP}*"):
        pid_text = tmp.name[len(f".{path.name}{_TMP}"):].split("-")[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _temp_name(path: Path) -> str:
    return f".{path.name}{_TMP}{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(path):
    """Yield an empty temporary directory next to ``path``; when the block ends normally it
    replaces ``path`` (an existing ``path`` is moved aside first and removed after), otherwise it
    is removed. Temporary directories of killed runs are cleaned up first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(path), dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_name(path) + "old-", dir=path.parent))
            os.rename(path, old / "entry")
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """Yield ``(file, temp_path)`` open for writing next to ``path``; renamed over ``path`` when
    the block ends normally (after an fsync), removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name(path), dir=path.parent)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, mode) as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    with atomic_file(path, "w") as (f, _):
        f.write(text)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path, "wb") as (f, _):
        f.write(data)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path`` (with the same suffix) for a library that writes
    files by name (``np.savez``, ``export_library``); it is renamed over ``path`` when the block
    ends normally, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
