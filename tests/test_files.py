"""Replacing an output folder is crash-safe at every instant: real SIGKILLs between the steps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from qlora_pipeline import files
from qlora_pipeline.files import atomic_dir, recover


def _write(target: Path, text: str) -> None:
    with atomic_dir(target) as tmp:
        (tmp / "part1").write_text(text)
        (tmp / "part2").write_text(text)


def _state(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _killed(script: str, cwd: Path) -> int:
    """Run `script` in a child that kills itself (SIGKILL) where the script says."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd).returncode


def test_an_output_is_exchanged_with_its_replacement_in_one_step(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write(target, "old")
    swaps = []
    real = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: swaps.append(b) or real(a, b))
    _write(target, "new")
    assert swaps == [target]  # renameat2(RENAME_EXCHANGE): no instant without an output
    assert _state(target) == {"part1": "new", "part2": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one is gone, no temporary


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_write(tmp_path):
    """Where the exchange is missing the old output is moved aside, then the new one put in place:
    killed between the two, the next write finds it aside and puts it back first."""
    target = tmp_path / "out"
    _write(target, "old")
    code = _killed(
        """
        import os, signal
        from pathlib import Path
        from qlora_pipeline import files
        files._exchange = lambda a, b: False  # a file system without renameat2
        real, calls = os.rename, []
        def rename(a, b):
            calls.append(b)
            if len(calls) == 2:  # the old output moved aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        os.rename = rename
        with files.atomic_dir(Path("out")) as tmp:
            (tmp / "part1").write_text("new")
        """,
        tmp_path,
    )
    assert code == -9
    assert not target.exists() and files.aside_of(target).is_dir()  # the documented state
    recover(target)
    assert _state(target) == {"part1": "old", "part2": "old"}  # the previous output, complete
    _write(target, "new")
    assert _state(target) == {"part1": "new", "part2": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_while_writing_leaves_the_output_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "out"
    _write(target, "old")
    code = _killed(
        """
        import os, signal
        from pathlib import Path
        from qlora_pipeline.files import atomic_dir
        with atomic_dir(Path("out")) as tmp:
            (tmp / "part1").write_text("new")
            os.kill(os.getpid(), signal.SIGKILL)  # half-written
        """,
        tmp_path,
    )
    assert code == -9
    assert _state(target) == {"part1": "old", "part2": "old"}
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1  # the killed writer's temporary
    _write(target, "new")
    assert _state(target) == {"part1": "new", "part2": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
