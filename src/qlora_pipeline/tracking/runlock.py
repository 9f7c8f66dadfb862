"""One run at a time per checkout: `run` and `retrain` write params.yaml and the same outputs, so a
second one started beside the first must not start (isolated parallel experiments get their own
workspaces). An exclusive `flock` on `.dvc/tmp/qlora-pipeline.lock`: the kernel releases it when
the holder ends, killed or not, so no stale lock survives a crash."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from qlora_pipeline.errors import PipelineError

_held: set[str] = set()  # locks this process holds: a flow inside `run` takes it again


def lock_path(root: Path) -> Path:
    return root / ".dvc" / "tmp" / "qlora-pipeline.lock"


@contextlib.contextmanager
def exclusive(root: Path, what: str) -> Iterator[None]:
    """Hold the checkout's run lock for `what` (e.g. "run"); re-entrant in one process.

    Raises:
        PipelineError: another process holds it (one line naming it).
    """
    path = lock_path(root)
    key = str(path.resolve())
    if key in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise PipelineError(
            f"another qlora-pipeline run is in progress in this checkout ({holder}); wait for "
            "it to end: two runs would write params.yaml and the same outputs"
        ) from None
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"{what}, pid {os.getpid()}, since {now}".encode())
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        os.close(fd)  # releases the lock
