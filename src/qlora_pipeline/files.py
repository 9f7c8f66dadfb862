"""Atomic writes and content hashes: outputs are either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import WRITE_ERRNOS, PipelineError


def seed_dir(folder: str | Path, seed: int) -> Path:
    """One training seed's folder in an arm's folder (adapters, evaluations): `<folder>/seed<N>`."""
    return Path(folder) / f"seed{seed}"


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the C library
    or the file system has no such call."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def aside_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.aside")


def recover(target: Path) -> None:
    """Undo what a crash of an earlier replacement left: the previous output moved aside with
    nothing in its place is put back; an aside copy beside a complete new output, and temporary
    folders of killed writers, are removed."""
    aside = aside_of(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` atomically.

    At every instant `target` is the old output or the new one, complete: the two are exchanged
    in one step (`renameat2(RENAME_EXCHANGE)`). Where that call is missing, the old output is
    moved aside first (`.<name>.aside`), and a crash between the two renames is undone by the next
    write to `target` (`recover`). On any exception the temporary folder is removed and `target`
    is left as it was.

    Raises:
        PipelineError: a write the system refused (full disk, quota, file size limit, read-only
            folder), naming `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            yield tmp
        except OSError as e:
            if errno.errorcode.get(e.errno or 0) not in WRITE_ERRNOS:
                raise
            what = "left as it was" if target.exists() else "not written"
            raise PipelineError(
                f"{target}: writing it failed ({e.strerror}); it is {what}"
            ) from None
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):  # exchanged: tmp holds the old output, removed below
            aside = aside_of(target)
            os.rename(target, aside)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of every file's relative path and content below `path` (order-independent)."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode())
        h.update(sha256_file(file).encode())
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
