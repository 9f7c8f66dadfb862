"""The Prefect flow: the DAG declared in dvc.yaml, one Prefect task per DVC stage.

DVC hashes inputs, skips unchanged stages and records lineage in dvc.lock; Prefect orders the
tasks, retries, logs and publishes the report as a markdown artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from qlora_pipeline.config.schema import load_params
from qlora_pipeline.reporting.gate import read_verdict
from qlora_pipeline.reporting.report import write_documents
from qlora_pipeline.tracking.dvc import compose, repro, stage_order, write_params
from qlora_pipeline.tracking.revisions import pinning_overrides


@task(task_run_name="compose params.yaml")
def compose_task(root: str, overrides: list[str]) -> dict:
    cfg = write_params(Path(root), overrides)
    get_run_logger().info("composed conf/ %s -> params.yaml", " ".join(overrides) or "(defaults)")
    return {"paths": vars(cfg.paths)}


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def stage_task(root: str, stage: str) -> str:
    """Reproduce one DVC stage (skipped by DVC when nothing it depends on changed)."""
    get_run_logger().info("dvc repro --single-item %s", stage)
    repro(Path(root), stage)
    return stage


@task(task_run_name="publish report")
def publish_task(root: str) -> str:
    """Render report.md/html again with this run's records, publish it as a Prefect artifact."""
    cfg = load_params(Path(root) / "params.yaml")
    p = cfg.paths
    exports = Path(root) / p.exports
    write_documents(
        cfg,
        Path(root) / p.data,
        Path(root) / p.adapters,
        Path(root) / p.report,
        exports if exports.is_dir() else None,
        Path(root) / p.runs,
    )
    report = Path(root) / p.report / "report.md"
    text = report.read_text(encoding="utf-8")
    create_markdown_artifact(markdown=text, key="quality-gap-report", description="QLoRA vs LoRA")
    return str(report)


@flow(name="qlora-pipeline")
def pipeline_flow(root: str, overrides: list[str]) -> str:
    """Compose the config, run every stage of dvc.yaml in dependency order, publish the report."""
    logger = get_run_logger()
    compose_task(root, overrides)
    done: dict[str, str] = {}
    for stage, upstream in stage_order(Path(root)):
        done[stage] = stage_task(root, stage, wait_for=[done[u] for u in upstream])
    report = publish_task(root, wait_for=list(done.values()))
    logger.info("report: %s (and report.html, metrics.json beside it)", report)
    return str(report)


GATE_FAILED = 3


def run(root: Path, overrides: list[str]) -> int:
    """Entry point of `qlora-pipeline run`: validate overrides first, then run the flow.

    Returns 0, 1 when a stage failed, or 3 when the quality gate says FAIL and
    `report.gate.enforce` is on (the report is written either way).
    """
    _, cfg = compose(root, overrides)  # fail fast, before Prefect starts, on a bad override
    pinning_overrides(cfg)  # ... or on a hub revision that cannot be pinned to a commit
    state = pipeline_flow(str(root), list(overrides), return_state=True)
    if state.is_failed():
        print(f"error: pipeline failed: {state.message}", file=sys.stderr)
        return 1
    verdict, reasons = read_verdict(root / cfg.paths.report / "metrics.json")
    if verdict != "PASS" and cfg.report.gate.enforce:
        print(f"error: quality gate FAIL: {'; '.join(reasons)}", file=sys.stderr)
        return GATE_FAILED
    return 0
