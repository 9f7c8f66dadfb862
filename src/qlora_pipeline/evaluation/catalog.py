"""Which evaluation tasks exist, known without importing lm-eval (checked at compose time)."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

DEFAULT_TASKS_DIR = Path(__file__).parent / "tasks"


def tasks_dir(configured: str | None) -> Path:
    """`eval.tasks_dir`, or the package's own YAML tasks."""
    return Path(configured) if configured else DEFAULT_TASKS_DIR


@functools.cache
def _harness_yaml() -> tuple[str, ...]:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return ()
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return tuple(p.read_text(encoding="utf-8", errors="ignore") for p in root.rglob("*.yaml"))


def known_task(name: str, task_dir: Path) -> bool:
    """A YAML task of `task_dir`, or a name that a YAML file of lm-eval's own tasks declares as a
    task, group or tag (a text scan, ~0.3 s, instead of indexing them all, ~9 s)."""
    if (task_dir / f"{name}.yaml").is_file():
        return True
    declared = re.compile(rf"(?m)^\s*(-\s*)?((task|group|tag):)?\s*(-\s*)?{re.escape(name)}\s*$")
    return any(declared.search(text) for text in _harness_yaml())
