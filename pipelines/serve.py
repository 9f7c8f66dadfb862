"""`qlora-pipeline serve`: the retraining flow as a Prefect deployment on the cron schedule of
`conf/schedule/<name>.yaml`, against the Prefect server `PREFECT_API_URL` names.

Served (the default): this process registers the deployment and runs its scheduled and
triggered runs until stopped. With `--pool`: the deployment is registered on a work pool (a
`process` pool, or Docker / Kubernetes ones) and a worker started on that pool
(`prefect worker start --pool NAME`) runs it, on this machine or another one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_pipeline.errors import ConfigError

ENTRYPOINT = "pipelines/flow.py:retrain_flow"


@dataclass
class ScheduleConfig:
    name: str = "weekly"
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    overrides: list[str] = field(default_factory=list)
    paused: bool = False


def load_schedule(root: Path, name: str) -> ScheduleConfig:
    """`conf/schedule/<name>.yaml`, validated: one line naming the file and key when wrong.

    Raises:
        ConfigError: a missing file, an unknown key, a bad cron string.
    """
    from prefect.schedules import validate_cron_string

    path = root / "conf" / "schedule" / f"{name}.yaml"
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{path}: no such schedule; conf/schedule has {found}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), OmegaConf.load(path))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: key '{getattr(e, 'full_key', '?')}': {e.msg}") from None
    assert isinstance(cfg, ScheduleConfig)
    try:
        validate_cron_string(cfg.cron)
    except ValueError as e:
        raise ConfigError(f"{path}: key 'cron': {str(e).splitlines()[0]}") from None
    return cfg


def serve(root: Path, schedule: str, pool: str | None) -> int:
    """Register the retraining deployment with its schedule; serve it here, or leave it to a
    worker on `pool`."""
    from prefect import Flow
    from prefect.schedules import Cron

    from pipelines.checks import check_overrides
    from pipelines.flow import retrain_flow

    cfg = load_schedule(root, schedule)
    check_overrides(root, cfg.overrides)  # a bad override fails now, not at 3 a.m.
    schedules = [Cron(cfg.cron, timezone=cfg.timezone)]
    parameters = {"root": str(root), "overrides": list(cfg.overrides)}
    if pool is None:
        retrain_flow.serve(
            name=cfg.name,
            schedules=schedules,
            parameters=parameters,
            paused=cfg.paused,
            description="Scheduled retraining: promote the new QLoRA adapter only on PASS",
        )
        return 0
    remote = retrain_flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    assert isinstance(remote, Flow)  # from a sync context: the flow, not a coroutine
    remote.deploy(
        name=cfg.name,
        work_pool_name=pool,
        schedules=schedules,
        parameters=parameters,
        paused=cfg.paused,
        build=False,
        push=False,
    )
    return 0
