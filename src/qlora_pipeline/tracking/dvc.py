"""DVC helpers: compose params.yaml from conf/ exactly as `dvc exp run` does, read the stage DAG
declared in dvc.yaml, and reproduce one stage."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from qlora_pipeline.config.schema import PipelineConfig, validate_dict
from qlora_pipeline.errors import ERROR_FILE_ENV, ConfigError, PipelineError, StageInputError
from qlora_pipeline.files import atomic_write_text


def find_root(start: str | Path | None = None) -> Path:
    """The project folder: the nearest folder at or above `start` holding dvc.yaml and conf/."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    raise PipelineError(
        f"{here}: not inside a qlora-pipeline project (no dvc.yaml and conf/ above it)"
    )


def compose(root: Path, overrides: list[str]) -> tuple[str, PipelineConfig]:
    """Compose conf/ with Hydra overrides through DVC's own composition; validate the result.

    Returns:
        The YAML text DVC would write to params.yaml, and the typed config.
    """
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(root / "conf"), None, "config", tmp, list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"config: {str(e).strip().splitlines()[0]}") from None
        text = out.read_text(encoding="utf-8")
    cfg = validate_dict(yaml.safe_load(text))
    return text, cfg


def pinned_params(root: Path, overrides: list[str]) -> tuple[str, PipelineConfig]:
    """`compose`, then every moving name pinned: hub revisions to commit SHAs, and
    `report.accepted_rev: promoted` to the registry tag of the version in prod."""
    from qlora_pipeline.tracking.registry import pinning_override
    from qlora_pipeline.tracking.revisions import pinning_overrides

    text, cfg = compose(root, overrides)
    pins = [*pinning_overrides(cfg), *pinning_override(cfg.report.accepted_rev, root)]
    if pins:
        text, cfg = compose(root, [*overrides, *pins])
    return text, cfg


def write_params(root: Path, overrides: list[str]) -> PipelineConfig:
    """Compose and pin (`pinned_params`), then replace params.yaml atomically (a bad override
    leaves it untouched)."""
    text, cfg = pinned_params(root, overrides)
    atomic_write_text(root / "params.yaml", text)
    return cfg


def stage_order(root: Path) -> list[tuple[str, list[str]]]:
    """The stages of dvc.yaml in dependency order, each with the stages it waits for (by name,
    whatever the working folder: a served flow run starts elsewhere)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        # Only stages of dvc.yaml: a `.dvc` file (the frozen evaluation set) is data, not a task.
        staged = [s for s in order if isinstance(s, PipelineStage)]
        return [
            (s.name, sorted(d.name for d in graph.successors(s) if isinstance(d, PipelineStage)))
            for s in staged
        ]


def missing_outputs(root: Path) -> list[str]:
    """The outputs dvc.lock records that are not in the working folder (a fresh clone has
    none of them): a cheap hint, without DVC, that stages will compute or restore.

    Read with PyYAML's C loader where it has one, without importing DVC: this runs before
    Prefect starts, on the command's critical path."""
    try:
        text = (root / "dvc.lock").read_text(encoding="utf-8")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        stages = yaml.load(text, Loader=loader)["stages"]
        paths = [o["path"] for s in stages.values() for o in s.get("outs", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return []  # no or an unreadable dvc.lock: DVC says what is wrong with it
    return [p for p in paths if not (root / p).exists()]


def changed_stages(root: Path) -> list[str]:
    """The names of the stages `dvc repro` would run: their deps, params, code or outputs
    changed, whatever the working folder."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # keyed by address, relative to the working folder ("../x/dvc.yaml:train@lora-0")
        # when that is not `root`: the stage name is what follows the last ":"
        return sorted(key.rsplit(":", 1)[-1] for key in repo.status())


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage commands: this interpreter's bin folder first, so `qlora-pipeline`
    in dvc.yaml resolves to the same installation that runs the flow; `extra` on top."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, **(extra or {})}


def run_dvc(root: Path, argv: list[str], env: dict[str, str], quiet: bool = False) -> int:
    """`dvc <argv>` in `root` (`dvc_cli`: without the per-stage git hints): in a child of the fork
    server `env` names (DVC imported already), else as a process of its own. Its exit status;
    `quiet` drops its output."""
    from qlora_pipeline.forkserver import ENV as FORKSERVER_ENV
    from qlora_pipeline.forkserver import dvc

    address = env.get(FORKSERVER_ENV)
    code = dvc(address, argv, str(root), env, quiet) if address else None
    if code is None:
        out = subprocess.DEVNULL if quiet else None
        cmd = [sys.executable, "-m", "qlora_pipeline.tracking.dvc_cli", *argv]
        code = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=out).returncode
    return code


def repro(
    root: Path, stage: str, extra_env: dict[str, str] | None = None, force: bool = False
) -> None:
    """`dvc repro --single-item <stage>`: runs it if its deps or params changed, else skips it;
    with `force`, runs it anyway and restores nothing from DVC's run cache (`reproduce`).
    `extra_env` reaches the stage command (the fork server's address, where DVC runs too).

    Stages run concurrently in one workspace: DVC releases the repository lock while a command
    runs, but takes it at the start and the end of each stage, and fails at once when another
    `dvc` holds it (treeverse/dvc#10465); `--wait-for-lock` makes it wait instead.

    A failed stage's earlier outputs are restored: DVC removes them before it runs a stage.

    Raises:
        StageInputError: the command stopped on a problem the user can fix; its one line.
        PipelineError: it failed otherwise (its traceback is in the output above).
    """
    argv = ["--wait-for-lock", "repro", "--single-item", stage]
    if force:
        argv[-1:-1] = ["--force", "--no-run-cache"]
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("r", dir=tmp, prefix=f"{stage}.", suffix=".error") as f:
        env = stage_env({**(extra_env or {}), ERROR_FILE_ENV: f.name})
        code = run_dvc(root, argv, env)
        said = f.read().strip()
    if code != 0:
        # DVC removed the stage's outputs before running it: put back the ones dvc.lock still
        # records (from DVC's cache), so a failed stage loses nothing
        run_dvc(
            root, ["--wait-for-lock", "checkout", "-q", stage], stage_env(extra_env), quiet=True
        )
    if code != 0 and said:
        raise StageInputError(f"stage '{stage}': {said}")
    if code != 0:
        raise PipelineError(f"stage '{stage}' failed (exit {code}); its output is above")


def freeze_test(root: Path, cfg: PipelineConfig, reset: bool = False) -> tuple[Path, int]:
    """Freeze the test split the data gives now to `data.frozen_test`, tracked by DVC (`dvc add`:
    the `.dvc` file goes to git, the items to the remote with the next push). Paths in `cfg` are
    relative to `root`, which must be the working folder.

    Returns:
        The frozen file and its number of items.

    Raises:
        PipelineError: `data.frozen_test` is null, or a frozen set exists and `reset` is off.
    """
    from qlora_pipeline.data import frozen
    from qlora_pipeline.data.prepare import clean_splits, read_source

    if not cfg.data.frozen_test:
        raise PipelineError("config key 'data.frozen_test' is null: no frozen evaluation set")
    path = root / cfg.data.frozen_test
    if path.exists() and not reset:
        raise PipelineError(
            f"{cfg.data.frozen_test}: the evaluation set is already frozen "
            f"({len(frozen.read(path)[0])} items); replacing it resets every comparison with "
            "earlier versions: `qlora-pipeline freeze-test --reset -m WHY`"
        )
    splits, _, _ = clean_splits(cfg.data, cfg.seed, read_source(cfg.data, cfg.seed))
    frozen.write(path, splits["test"])
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "-q", str(path.relative_to(root))],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc add {path}: {proc.stderr.strip()[-300:]}")
    return path, len(splits["test"])
