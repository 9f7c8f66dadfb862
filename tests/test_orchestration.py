"""Prefect as the orchestrator: independent stages run as concurrent task runs within the slots of
a global concurrency limit, in one DVC workspace; a transient failure is retried; task runs are
named by stage and config hash; the scores are a table artifact of the flow run."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, TINY, copy_project

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import read_json

pytestmark = pytest.mark.slow

TWO_SLOTS = [
    *TINY,
    "seeds=[0]",
    "model.bootstrap.steps=30",  # the flow is under test, not what the model learns
    "model.bootstrap.corpus_lines=2000",
    "train.max_steps=150",  # long enough for the two arms' runs to overlap
    "eval.limit=8",
    "train.eval_steps=null",
    "train.save_steps=null",
    "orchestration.slots=2",
    "orchestration.retry_delays_s=[1]",
]


def _span(record: dict) -> tuple[datetime, datetime]:
    return (
        datetime.fromisoformat(record["started_at"]),
        datetime.fromisoformat(record["finished_at"]),
    )


def test_two_slots_run_the_arms_at_once_and_a_transient_failure_is_retried(tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

    from pipelines import flow
    from qlora_pipeline.tracking.dvc import changed_stages

    copy_project(tmp_path)
    attempts: list[str] = []
    real = flow.repro

    def flaky(root: Path, stage: str, *args: object) -> None:
        attempts.append(stage)
        if stage == "prepare" and attempts.count("prepare") == 1:
            raise PipelineError("stage 'prepare' failed: injected transient fault")
        real(root, stage, *args)

    monkeypatch.setattr(flow, "repro", flaky)
    state = flow.pipeline_flow(str(tmp_path), TWO_SLOTS, return_state=True)
    assert state.is_completed(), state.message
    assert attempts.count("prepare") == 2  # failed once, retried, the flow completed

    # both arms ran at the same time (two slots), each in the fork server; DVC's lock held up
    runs = tmp_path / "runs"
    qlora, lora = read_json(runs / "train@qlora-0.json"), read_json(runs / "train@lora-0.json")
    (q0, q1), (l0, l1) = _span(qlora), _span(lora)
    assert q0 < l1 and l0 < q1, (q0, q1, l0, l1)
    assert qlora["forked"] and lora["forked"]
    assert changed_stages(tmp_path) == []  # dvc.lock has every stage: `dvc status` is clean

    config = hashlib.sha256((tmp_path / "params.yaml").read_bytes()).hexdigest()[:8]
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        names = {
            r.name
            for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
        }
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}),
            artifact_filter=ArtifactFilter(key={"any_": ["quality-gap-scores"]}),
        )
        limit = client.read_global_concurrency_limit_by_name("qlora-pipeline-heavy")
    assert f"train@qlora-0 [config {config}]" in names
    assert f"evaluate@merged [config {config}]" in names
    assert limit.limit == 2
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    rows = json.loads(artifacts[0].data)  # type: ignore[arg-type]  # the server keeps JSON
    assert rows[0]["task"] == "qlora_synthetic_qa"
    metrics = read_json(tmp_path / "reports/metrics.json")
    gap = metrics["tasks"]["qlora_synthetic_qa"]
    assert rows[0]["QLoRA − LoRA [95% CI]"] == (
        f"{gap['gap']:+.3f} [{gap['gap_ci_low']:+.3f}, {gap['gap_ci_high']:+.3f}]"
    )


def test_a_second_run_in_the_same_checkout_is_refused_with_one_line(tmp_path):
    from conftest import run_cli

    from qlora_pipeline.tracking.runlock import exclusive, lock_path

    copy_project(tmp_path)
    params = (tmp_path / "params.yaml").read_bytes()
    with exclusive(tmp_path, "qlora-pipeline run"):  # a first run, in this process
        second = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "train.max_steps=5")
        retrain = run_cli(tmp_path, "-m", "qlora_pipeline", "retrain")
    for proc in (second, retrain):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            "error: another qlora-pipeline run is in progress in this checkout "
            f"(qlora-pipeline run, pid {os.getpid()}, since "
        ), lines
    assert (tmp_path / "params.yaml").read_bytes() == params  # nothing written
    assert not (tmp_path / "models").exists()
    # released when its holder ends, however it ends: the next run may start
    with exclusive(tmp_path, "qlora-pipeline run"):
        assert "pid" in lock_path(tmp_path).read_text()


def test_the_committed_lock_records_the_stages_of_dvc_yaml_and_no_others():
    """DVC keeps a removed or renamed stage's entry in dvc.lock for good; every stage reads
    and rewrites the whole file, and the stale entry's outputs would still look recorded."""
    import yaml

    from qlora_pipeline.tracking.dvc import stage_order

    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked == {name for name, _ in stage_order(ROOT)}


def test_flow_runs_on_the_temporary_server_send_no_heartbeats(tmp_path):
    """`api.TEMPORARY_SETTINGS`: heartbeats let a server tell a crashed flow run, and the
    temporary one ends with the command. A flow run on it runs with them off (Prefect then
    starts no heartbeat thread, whose join held the run's end up to 1 s); after `stop`, and on
    your server (PREFECT_API_URL), Prefect's default."""
    import shutil
    import subprocess
    import sys

    from conftest import prefect_home

    script = (
        "from pipelines import api\n"
        "api.start(); api.ready()\n"
        "from prefect import flow\n"
        "from prefect.settings import get_current_settings\n"
        "@flow\n"
        "def probe():\n"
        "    return get_current_settings().flows.heartbeat_frequency\n"
        "frequency = probe()\n"
        "api.stop()\n"
        "print(frequency, get_current_settings().flows.heartbeat_frequency)\n"
    )
    home = tmp_path / ".prefect"
    shutil.copytree(prefect_home(), home)
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "180"]  # off for the command's flow runs only


def test_a_run_killed_holding_a_slot_does_not_block_the_next_one(tmp_path):
    """SIGKILL a run while its first stage holds the slot: the checkout's Prefect database still
    records the slot as held, and its lease lived in the killed run's temporary server. The next
    run frees it, says so, and completes (it used to wait for the slot for ever)."""
    import signal
    import sqlite3
    import subprocess
    import sys

    from conftest import cli_env, run_cli

    quick = [o for o in TWO_SLOTS if not o.startswith(("orchestration.", "train.max_steps"))]
    quick.append("train.max_steps=20")  # one slot, the default
    copy_project(tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "qlora_pipeline", "run", *quick],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its servers and stages too
    )
    assert first.stdout is not None
    said = []
    for line in first.stdout:
        said.append(line)
        if line.startswith("> qlora-pipeline bootstrap"):  # the stage holds the slot
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert said[-1].startswith("> qlora-pipeline bootstrap"), "".join(said)
    db = sqlite3.connect(tmp_path / ".prefect" / "prefect.db")
    held = db.execute("select active_slots from concurrency_limit_v2").fetchall()
    db.close()
    assert held == [(1,)]  # the fault: a slot nobody holds

    again = run_cli(tmp_path, "-m", "qlora_pipeline", "run", *quick, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (
        "note: freed 1 slot(s) of the concurrency limit 'qlora-pipeline-heavy' that a killed "
        "run held" in again.stderr
    )
    assert (tmp_path / "reports" / "metrics.json").is_file()
