"""Clean workspaces beside the checkout: git worktrees under `.dvc/tmp/` that share its DVC cache.

A reproduction recomputes a recorded revision in one; a sweep runs each point in one, so points
never write each other's files, and stages whose inputs they share are computed once and
restored from DVC's run cache in the others (the cache is the checkout's).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.errors import PipelineError


def git(root: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, input=stdin)


def add(root: Path, rev: str, work: Path, changes: bytes = b"") -> Path:
    """A git worktree of `rev` at `work` (replacing one left there) with `changes` (a binary
    `git diff`) applied, DVC's cache set to this checkout's, and its DVC-tracked inputs (the
    frozen evaluation set) checked out. It holds no output.

    Raises:
        PipelineError: the worktree cannot be made or the changes do not apply.
    """
    remove(root, work)
    added = git(root, "worktree", "add", "--detach", "-q", str(work), rev)
    if added.returncode != 0:
        raise PipelineError(f"git worktree add {rev[:12]}: {added.stderr.decode().strip()}")
    if changes:
        applied = git(work, "apply", "--binary", "--index", "-", stdin=changes)
        if applied.returncode != 0:
            remove(root, work)
            raise PipelineError(f"uncommitted changes: {applied.stderr.decode().strip()}")
    cache = (root / ".dvc" / "cache").resolve()
    (work / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n", encoding="utf-8")
    tracked = git(work, "ls-files", "*.dvc").stdout.decode().split()
    if tracked:
        subprocess.run(
            [sys.executable, "-m", "dvc", "checkout", "-q", *tracked],
            cwd=work,
            capture_output=True,
        )
    return work


def uncommitted(root: Path) -> bytes:
    """The checkout's changes to tracked (and staged) files as a binary diff against HEAD."""
    return git(root, "diff", "HEAD", "--binary").stdout


def remove(root: Path, work: Path) -> None:
    git(root, "worktree", "remove", "--force", str(work))
    shutil.rmtree(work, ignore_errors=True)
    git(root, "worktree", "prune")
