"""Where installed models, corpora and downloads live (outside the repository)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("AQLM_COMPILE_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "aqlm-compile"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(final: Path, keep_existing: bool = False):
    """Yield a temporary directory beside `final`; rename it into place only if the block succeeds.

    `keep_existing` (caches, whose content is fixed by their name): when another process put `final` in place while
    this one was filling its own, keep theirs and drop ours — a folder another process may be reading is never
    removed. Otherwise an existing `final` is swapped with the new folder in one atomic step (`exchange`), so a kill
    at any moment leaves the old or the new folder under the final name, never neither (where the swap is not
    available: renamed aside, and put back if the rename in fails)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    started = tmp.stat().st_ctime
    old = None

    def placed_meanwhile() -> bool:
        # renamed into place by another process while this one built (a rename sets the folder's ctime); an older
        # folder is whatever the caller found not ready, and is replaced
        try:
            return final.stat().st_ctime >= started
        except FileNotFoundError:
            return False

    try:
        yield tmp
        if final.exists():
            if keep_existing and placed_meanwhile():
                return
            if exchange(tmp, final):  # one atomic swap: `final` is the old folder, then the new, never absent
                return  # `tmp` now holds the old folder, removed below
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except OSError:
            if keep_existing and placed_meanwhile():  # lost a race to another process's rename: theirs stands
                return
            if old is not None and not final.exists():
                os.replace(old / final.name, final)  # put the previous folder back
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the kernel, libc
    or file system cannot; the caller then falls back to two renames."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
