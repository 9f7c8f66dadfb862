"""What `run` and `retrain` do before Prefect is imported: the overrides checked, and the fork
server started when stages will compute, so that its imports (~10 s of CPU) begin first thing,
beside the temporary Prefect server's start, not after the command's own import of Prefect."""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.config.schema import PipelineConfig, load_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.forkserver import start_early
from qlora_pipeline.modeling.plan import preflight
from qlora_pipeline.tracking.dvc import compose, missing_outputs
from qlora_pipeline.tracking.revisions import pinning_overrides


def check_overrides(root: Path, overrides: list[str]) -> PipelineConfig:
    _, cfg = compose(root, overrides)  # fail fast, before Prefect starts, on a bad override
    pinning_overrides(cfg)  # ... or on a hub revision that cannot be pinned to a commit
    refused = preflight(cfg)  # ... or on a config that cannot fit the GPU
    if refused is not None:
        raise PipelineError(*refused)
    return cfg


def prelaunch(root: Path, overrides: list[str]) -> PipelineConfig:
    """`check_overrides`, then `start_fork_server_early`; the checked config."""
    cfg = check_overrides(root, overrides)
    start_fork_server_early(root, cfg)
    return cfg


def start_fork_server_early(root: Path, cfg: PipelineConfig) -> None:
    """When stages will surely run (no dvc.lock yet, other params, or outputs dvc.lock records
    missing, as in a fresh clone), start the fork server now: its imports then overlap the
    flow's start instead of delaying the first stage. Otherwise the flow starts one if
    `dvc status` finds work (a warm run starts none)."""
    try:
        same = load_params(root / "params.yaml") == cfg
    except PipelineError:
        same = False
    if not same or not (root / "dvc.lock").is_file() or missing_outputs(root):
        start_early(cfg.runtime.cpu_kernels, cfg.runtime.threads)
