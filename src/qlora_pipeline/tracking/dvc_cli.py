"""`dvc` as the pipeline runs it once per stage (`tracking.dvc.run_dvc`: in the fork server, or as
`python -m qlora_pipeline.tracking.dvc_cli`): DVC's own CLI with two changes.

- Less the hint it logs after every stage to `git add dvc.lock` and to turn on autostaging (seven
  lines, fifteen times a run; the README says once what a run leaves to commit).
- dvc.lock is read with the safe C parser when DVC rewrites it after a stage (`lock_fast_path`),
  not with ruamel's round-trip one, which keeps comments and is pure Python: 0.14 s against
  0.02 s for the default run's lock, once a stage. dvc.lock is DVC's own output, without
  comments, and DVC's dumper writes the same bytes from either (tests/test_dvc_cli.py).

In the fork server, `warm` does once, before any child, what each `dvc` child would do again:
import the modules DVC imports only as it runs and build DVC's (cached) argument parser
(benchmarks/bench_fork_dvc.py). There, too, a stage command `qlora-pipeline ...` runs in a fork of
the `dvc` child (`commands_in_fork`), not through a shell and a new interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

HINTS = "dvc.repo.scm_context"  # the logger of those hints; its warnings still show
# what `dvc repro` and `dvc checkout` import: at DVC's import, then as they run
IMPORTS = (
    "dvc.cli",
    "dvc.cli.parser",
    "dvc.repo.reproduce",
    "dvc.repo.checkout",
    "dvc.stage",
    "dvc.stage.cache",
    "dvc.dvcfile",
    "dvc.rwlock",
    "dvc.lock",
    "dvc.scm",
    "dvc.cachemgr",
    "dvc.data_cloud",
    "dvc.utils.strictyaml",
    "dvc_data.hashfile.db.local",
    "dvc_data.hashfile.status",
    "dvc_data.hashfile._progress",
    "dvc.dirs",
    "dvc.repo.artifacts",
    "dvc.repo.datasets",
    "dvc.repo.metrics",
    "dvc.repo.params",
    "dvc.repo.plots",
    "dvc.repo.stage",
    "dvc.repo.open_repo",
    "dulwich.index",
    "dulwich.ignore",
    "dulwich.worktree",
    "configobj",
    "platformdirs",
    "fsspec.implementations.memory",
    "ruamel.yaml",
)


def lock_fast_path() -> None:
    """Have DVC read a lock file it is about to rewrite with its safe parser (ruamel's C one),
    any other YAML file (dvc.yaml, whose comments it keeps) as before. Idempotent."""
    import dvc.dvcfile
    from dvc.utils.serialize import _common, _yaml

    rewrite: Callable[..., AbstractContextManager[Any]] = _yaml.modify_yaml

    def modify_yaml(path: Any, fs: Any = None) -> AbstractContextManager[Any]:
        if not os.fspath(path).endswith(".lock"):
            return rewrite(path, fs=fs)
        return _common._modify_data(path, _yaml.parse_yaml, _yaml._dump, fs=fs)

    if dvc.dvcfile.modify_yaml is rewrite:
        dvc.dvcfile.modify_yaml = modify_yaml


def own_command(cmd: str) -> list[str] | None:
    """The arguments of a stage command that is exactly `qlora-pipeline <arguments>`, which a shell
    would pass on unchanged (no expansion, redirection, pipes or lists); else None."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if len(words) < 2 or words[0] != "qlora-pipeline" or shlex.join(words) != cmd.strip():
        return None
    return words[1:]


def commands_in_fork() -> None:
    """Have DVC run a stage command `qlora-pipeline <arguments>` in a fork of this process (a
    child of the fork server: `forkserver.command_here`), not through a shell that starts a new
    interpreter which hands it to the server; any other command, or one the server would not
    serve, as before. Idempotent."""
    import dvc.stage.run
    from dvc.stage.exceptions import StageCmdFailedError

    from qlora_pipeline.forkserver import command_here

    spawn: Callable[..., None] = dvc.stage.run._run

    def _run(executable: str | None, cmd: str, **kwargs: Any) -> None:
        argv = own_command(cmd)
        code = None if argv is None else command_here(argv, kwargs["cwd"], kwargs["env"])
        if code is None:
            return spawn(executable, cmd, **kwargs)
        if code != 0:
            raise StageCmdFailedError(cmd, code)
        return None

    if spawn.__module__ == "dvc.stage.run":  # DVC's own, not already this one
        dvc.stage.run._run = _run


def warm() -> None:
    """What every `dvc` child would do on its own, done once in the fork server; and its children
    run stage commands in forks of themselves (`commands_in_fork`)."""
    from dvc.cli.parser import get_main_parser

    for name in IMPORTS:
        importlib.import_module(name)
    get_main_parser()  # lru-cached by DVC
    lock_fast_path()
    commands_in_fork()


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main

    lock_fast_path()
    logging.getLogger(HINTS).setLevel(logging.WARNING)
    return int(dvc_main(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
