"""`qlora-pipeline run -m ...`: a sweep, every point of it its own isolated experiment.

Hydra expands the overrides (its multirun grammar: `a=1,2`, `range(...)`, `choice(...)`) into
points. Each point runs in a workspace of its own (`workspace.add`: a git worktree of HEAD plus
the checkout's uncommitted changes, sharing the DVC cache), with its own params.yaml, outputs and
run records, so two points never write the same file; it is then saved as a DVC experiment
(`dvc exp save`), which `dvc exp show`, `qlora-pipeline experiments` and `reproduce` read.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.files import read_json, seed_dir
from qlora_pipeline.tracking import workspace
from qlora_pipeline.tracking.perf import read_records

_SAVING = threading.Lock()  # `dvc exp save` moves a shared ref (refs/exps/exec): one at a time


def _parsed(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return list(OverridesParser.create().parse_overrides(list(overrides)))
    except HydraException as e:
        raise ConfigError(f"config: {str(e).strip().splitlines()[0]}") from None


def grid(overrides: list[str]) -> list[list[str]]:
    """Every point of a Hydra multirun override list (its cartesian product, in Hydra's order:
    Hydra's basic sweeper).

    Raises:
        ConfigError: an override Hydra cannot parse, naming it.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(_parsed(overrides), None)
    return [point for batch in batches for point in batch]


def swept(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The overrides split into those fixed for every point and the search axes (`a=1,2`,
    `choice(...)`, `range(...)`, `interval(...)`).

    Raises:
        ConfigError: an override Hydra cannot parse.
    """
    parsed = _parsed(overrides)
    fixed = [o for o, p in zip(overrides, parsed, strict=True) if not p.is_sweep_override()]
    axes = [o for o, p in zip(overrides, parsed, strict=True) if p.is_sweep_override()]
    return fixed, axes


Launch = Callable[[list[list[str]]], list[tuple[float, float] | None]]


def optuna_search(
    axes: list[str], trials: int, batch: int, seed: int, out_dir: Path, launch: Launch
) -> dict[str, Any]:
    """Hydra's Optuna sweeper over `axes`: `trials` trials, `batch` at a time, each batch given to
    `launch` (which runs the trials as sweep points and returns each one's objectives, QLoRA
    score to maximize and training memory to minimize, or None for a failed point). NSGA-II,
    seeded: with few trials its first generation is a seeded random search of the space.
    Writes Optuna's optimization_results.yaml (its Pareto solutions) into `out_dir`; returns it."""
    import optuna
    import yaml
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    from omegaconf import OmegaConf

    class PointLauncher:  # what Hydra's launcher plugin would be: a batch of trials as points
        def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
            values = launch([list(o) for o in job_overrides])
            return [
                JobReturn(
                    overrides=list(o),
                    status=JobStatus.COMPLETED if v is not None else JobStatus.FAILED,
                    _return_value=v if v is not None else PipelineError("the point failed"),
                )
                for o, v in zip(job_overrides, values, strict=True)
            ]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweeper = OptunaSweeperImpl(
        sampler=optuna.samplers.NSGAIISampler(seed=seed),
        direction=["maximize", "minimize"],
        storage=None,
        study_name=out_dir.name,
        n_trials=trials,
        n_jobs=batch,
        max_failure_rate=1.0,  # a failed point is reported with the sweep, not raised here
        search_space=None,
        custom_search_space=None,
        params=None,
    )
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(out_dir)}}})
    # No Hydra app to set up (`setup` would build Hydra's own launcher): the two things it keeps.
    sweeper.hydra_context = "qlora-sweep"  # type: ignore[assignment]
    sweeper.launcher = PointLauncher()  # type: ignore[assignment]
    out_dir.mkdir(parents=True, exist_ok=True)
    sweeper.sweep(list(axes))
    return dict(yaml.safe_load((out_dir / "optimization_results.yaml").read_text()))


def varying(points: list[list[str]]) -> list[list[str]]:
    """Each point's overrides that differ between points (what names a point in the report)."""
    keys = [dict(o.split("=", 1) for o in p if "=" in o) for p in points]
    differ = {k for k in set().union(*keys) if len({d.get(k) for d in keys}) > 1}
    return [[o for o in p if o.split("=", 1)[0] in differ] for p in points]


def default_name(now: datetime | None = None) -> str:
    return f"sweep-{(now or datetime.now(UTC)).strftime('%Y%m%d-%H%M%S')}"


def experiment_names(sweep: str, n: int) -> list[str]:
    return [f"{sweep}-{k}" for k in range(1, n + 1)]


def existing_experiments(root: Path) -> set[str]:
    refs = workspace.git(root, "for-each-ref", "--format=%(refname)", "refs/exps")
    return {r.rsplit("/", 1)[-1] for r in refs.stdout.decode().split()}


def check(root: Path, sweep: str, n: int, axes: bool = True) -> None:
    """A sweep needs a commit (its points are worktrees of HEAD), names not taken and, for a
    search, `axes` to search.

    Raises:
        PipelineError: no commit yet, an experiment of that name exists, or nothing to search.
    """
    if not axes:
        raise PipelineError(
            "--trials: no search axis among the overrides (e.g. train.lora.r=choice(4,8,16) "
            "train.lr=interval(1e-4,1e-3))"
        )
    if workspace.git(root, "rev-parse", "--verify", "--quiet", "HEAD").returncode != 0:
        raise PipelineError("a sweep's points are worktrees of HEAD: commit the project first")
    taken = sorted(existing_experiments(root) & set(experiment_names(sweep, n)))
    if taken:
        raise PipelineError(
            f"--sweep-name {sweep}: experiment {taken[0]} exists (`dvc exp remove {taken[0]}`, "
            "or another name)"
        )


def point_workspace(root: Path, sweep: str, name: str, changes: bytes, runs_dir: str) -> Path:
    """The point's worktree under .dvc/tmp/sweeps/<sweep>/, its run records emptied: after the
    run they are the stages this point computed (the others came from DVC's cache)."""
    work = workspace.add(root, "HEAD", root / ".dvc" / "tmp" / "sweeps" / sweep / name, changes)
    for record in (work / runs_dir).glob("*.json"):
        record.unlink()
    return work


def save(work: Path, name: str, records: list[str]) -> str:
    """Save the point's workspace as the DVC experiment `name` (git-tracked `records`, new or
    not: the report, the run records); its commit.

    Raises:
        PipelineError: `dvc exp save` failed (its last line).
    """
    with _SAVING:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "save", "-q", "-n", name]
            + [arg for path in records for arg in ("-I", path)],
            cwd=work,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise PipelineError(f"dvc exp save -n {name}: {said[-1] if said else 'failed'}")
        refs = workspace.git(work, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    for line in refs.stdout.decode().splitlines():
        sha, ref = line.split()
        if ref.endswith(f"/{name}"):
            return sha
    raise PipelineError(f"dvc exp save -n {name}: no experiment ref was written")


def point_row(work: Path, cfg: PipelineConfig, name: str, overrides: list[str]) -> dict[str, Any]:
    """What the sweep report shows of one finished point: the headline figures of its first
    evaluation task, the shipped QLoRA training's tensor accounting (train_metrics.json) and
    its measured speed (the run record, when this point computed it)."""
    p = cfg.paths
    metrics = read_json(work / p.report / "metrics.json")
    task = cfg.eval.tasks[0]
    seed = cfg.seeds[0]
    adapter = seed_dir(work / p.adapters / "qlora", seed)
    record = read_records(work / p.runs).get(f"train@qlora-{seed}", {})
    return {
        "name": name,
        "overrides": overrides,
        "task": task,
        "figures": metrics["tasks"][task],
        "verdict": metrics["verdict"],
        "train": read_json(adapter / "train_metrics.json"),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "tokens_per_s": record.get("tokens_per_s"),
        "peak_cuda_mb": record.get("peak_cuda_allocated_mb"),
    }
