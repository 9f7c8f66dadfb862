"""The unattended retraining flow in a scratch clone. Served as a deployment against a real
Prefect server (its own process, port and database), triggered through the API: it promotes, then
is a no-op. A process work pool's worker runs it too, then retrains on new data, compared paired
with the promoted version on the frozen evaluation set. From the CLI: a forced FAIL leaves prod
alone, a failed push takes the promotion back (Prefect transaction), a rollback restores the
previous version."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY, copy_project, prefect_home, run_cli

pytestmark = pytest.mark.slow

# The whole DAG in seconds of compute, with a gate that every real run passes: the retraining flow
# is under test here (schedule, freeze, commit, promotion, no-op, rollback), not the tiny model,
# which learns nothing in 8 steps. A FAIL is forced with min_gain_over_base=0.99.
FAST = [
    *TINY,
    "seeds=[0]",
    "model.bootstrap.steps=30",
    "model.bootstrap.corpus_lines=2000",
    "train.max_steps=8",
    "train.eval_steps=null",
    "train.save_steps=null",
    "eval.limit=8",
    "report.gate.min_gain_over_base=-1.0",
    "report.gate.max_drop_vs_lora=1.0",
    "report.gate.max_drop_vs_accepted=1.0",
    "report.gate.max_cumulative_drop=1.0",
]


def _git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, check=True, capture_output=True, text=True
    ).stdout.strip()


def _tags(project: Path) -> list[str]:
    return _git(project, "tag").split()


def _retrain(project: Path, *overrides: str) -> tuple[int, str]:
    proc = run_cli(project, "-m", "qlora_pipeline", "retrain", *overrides)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("retrain")
    copy_project(project)
    schedule = {"name": "retrain-test", "cron": "0 3 * * 1", "overrides": FAST}
    (project / "conf/schedule/test.yaml").write_text(yaml.safe_dump(schedule))
    _git(project, "add", "-A")
    _git(project, "-c", "user.name=dev", "-c", "user.email=dev@x", "commit", "-qm", "clone")
    return project


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 and a free port, with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-server")
    shutil.copy2(prefect_home() / "prefect.db", home / "prefect.db")  # migrated once a session
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS"] = "1"
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    start = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", *start],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            home / "server.log"
        ).read_text()
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


# What `serve` and `prefect worker` poll the server at for scheduled work (Prefect's defaults, 10 s,
# are a user's; a test waits for every poll it triggers)
POLL = {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}


def _api(project: Path, url: str, code: str) -> subprocess.CompletedProcess:
    """Python against the server, as a user's script or the UI's API calls would be."""
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(project / ".prefect")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True
    )


TRIGGER = """
from prefect.deployments import run_deployment
run = run_deployment("qlora-retrain/retrain-test", timeout=900, poll_interval=2)
print(run.state.type.value)
print(run.state.message)
"""


def test_the_served_deployment_promotes_then_is_a_no_op(project, server):
    env = {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(project / ".prefect")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(POLL)
    log = project / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "qlora_pipeline", "serve", "--schedule", "test"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:  # registered, with the schedule of conf/schedule/test.yaml
                found = _api(
                    project,
                    server,
                    "from prefect import get_client\n"
                    "with get_client(sync_client=True) as c:\n"
                    "    d = c.read_deployment_by_name('qlora-retrain/retrain-test')\n"
                    "    print([s.schedule.cron for s in d.schedules])",
                )
                if found.returncode == 0:
                    break
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            assert found.stdout.strip() == "['0 3 * * 1']"

            # 1. a triggered run: everything runs, the run is committed, v0.0.1 goes to prod
            run = _api(project, server, TRIGGER)
            state, message = run.stdout.strip().splitlines()[-2:]
            assert state == "COMPLETED", run.stdout + run.stderr + log.read_text()[-3000:]
            assert message == "promoted qlora-adapter v0.0.1 (before: nothing)"
            assert _tags(project) == ["qlora-adapter#prod#1", "qlora-adapter@v0.0.1"]
            author = _git(project, "log", "-1", "--format=%an <%ae> %s")
            assert author == (
                "qlora-pipeline <qlora-pipeline@localhost> Retraining run: quality gate PASS"
            )
            first = _git(project, "rev-parse", "HEAD")
            # the evaluation set was frozen for it, committed with the run, pushed with it
            assert "data/frozen/test.jsonl.dvc" in _git(project, "ls-files", "data/frozen")
            manifest = json.loads((project / "data/prepared/manifest.json").read_text())
            assert manifest["frozen_test"]["path"] == "data/frozen/test.jsonl"
            stages = log.read_text().count("Running stage")
            assert stages >= 10

            # 2. triggered again, nothing changed: no stage runs, nothing is committed or tagged.
            # The promotion changed the report's input (report.accepted_rev is pinned to the
            # version in prod), but the models are the ones already judged: no report either.
            run = _api(project, server, TRIGGER)
            state, message = run.stdout.strip().splitlines()[-2:]
            assert state == "COMPLETED", run.stdout + run.stderr
            assert message == (
                "no-op: data, config and code unchanged; qlora-adapter v0.0.1 stays in prod"
            )
            assert log.read_text().count("Running stage") == stages
            assert _git(project, "rev-parse", "HEAD") == first and len(_tags(project)) == 2
            assert _git(project, "status", "--porcelain", "--untracked-files=no") == ""
        finally:
            serve.terminate()
            serve.wait(timeout=60)


def test_a_second_clone_fetches_the_promoted_adapter_from_the_remote(project):
    """The promotion pushed data and adapters to the default DVC remote (a folder beside the
    checkout); a clone finds the version in prod with GTO, pulls it, loads it with plain peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = project.parent / "qlora-pipeline-store"
    assert store.is_dir() and any(store.rglob("*")), "the promotion pushed nothing"
    clone = project.parent / f"{project.name}-clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    gto = Path(sys.executable).parent / "gto"
    ref = subprocess.run(
        [str(gto), "show", "qlora-adapter#prod", "--ref"],
        cwd=clone,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert ref == "qlora-adapter@v0.0.1"
    _git(clone, "checkout", "-q", ref)
    assert not (clone / "models").exists()
    adapter = "models/adapters/qlora/seed0"
    pull = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "models/base", adapter],
        cwd=clone,
        capture_output=True,
        text=True,
    )
    assert pull.returncode == 0, pull.stdout + pull.stderr

    def logits(root: Path) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(root / "models/base", use_safetensors=True)
        model = PeftModel.from_pretrained(base, root / adapter).eval()
        with torch.no_grad():
            return model(torch.arange(1, 17).unsqueeze(0)).logits

    tree = _git(project, "rev-parse", f"{ref}^{{tree}}")
    assert _git(clone, "rev-parse", "HEAD^{tree}") == tree
    assert torch.equal(logits(clone), logits(project))  # the promoted adapter, fetched


def test_a_worker_on_a_process_pool_runs_the_deployment(project, server):
    """`serve --pool`: the deployment is registered on a work pool and returns; a `prefect worker`
    on that pool picks up the triggered run and runs the flow (here a no-op: nothing changed)."""
    env = {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(project / ".prefect")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(POLL)
    prefect = [sys.executable, "-m", "prefect"]
    create = ["work-pool", "create", "retrain-pool", "--type", "process"]
    made = subprocess.run([*prefect, *create], cwd=project, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    serve = [sys.executable, "-m", "qlora_pipeline", "serve", "--schedule", "test"]
    registered = subprocess.run(
        [*serve, "--pool", "retrain-pool"], cwd=project, env=env, capture_output=True, text=True
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    pools = _api(
        project,
        server,
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    d = c.read_deployment_by_name('qlora-retrain/retrain-test')\n"
        "    print(d.work_pool_name, [s.schedule.cron for s in d.schedules])",
    )
    assert pools.stdout.strip() == "retrain-pool ['0 3 * * 1']", pools.stdout + pools.stderr
    log = project / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "retrain-pool"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            head = _git(project, "rev-parse", "HEAD")
            run = _api(project, server, TRIGGER)
            state, message = run.stdout.strip().splitlines()[-2:]
            assert state == "COMPLETED", run.stdout + run.stderr + log.read_text()[-3000:]
            assert message == (
                "no-op: data, config and code unchanged; qlora-adapter v0.0.1 stays in prod"
            )
            assert "retrain-pool" in log.read_text()  # the worker ran it
            assert _git(project, "rev-parse", "HEAD") == head

            # new data, triggered with the run's parameters: prepare and everything downstream
            # rerun, compared paired with v0.0.1 on the frozen evaluation set, v0.0.2 promoted
            frozen = (project / "data/frozen/test.jsonl").read_bytes()
            new_data = {"root": str(project), "overrides": [*FAST, "data.synthetic.n_train=2200"]}
            run = _api(
                project,
                server,
                TRIGGER.replace("timeout=900", f"parameters={new_data!r}, timeout=900"),
            )
            state, message = run.stdout.strip().splitlines()[-2:]
            assert state == "COMPLETED", run.stdout + run.stderr + log.read_text()[-3000:]
            assert message == "promoted qlora-adapter v0.0.2 (before: qlora-adapter v0.0.1)"
            ran = re.findall(r"Running stage '([^']+)'", log.read_text())
            assert ran[0] == "prepare" and "bootstrap" not in ran and "report" in ran
            metrics = json.loads((project / "reports/metrics.json").read_text())
            assert "qlora-adapter@v0.0.1" in metrics["accepted"]
            assert metrics["tasks"]["qlora_synthetic_qa"]["vs_accepted"]["paired"] is True
            assert (project / "data/frozen/test.jsonl").read_bytes() == frozen
            manifest = json.loads((project / "data/prepared/manifest.json").read_text())
            assert manifest["counts"]["train"]["read"] == 2200
        finally:
            # `prefect worker start` passes SIGTERM on to its worker as SIGINT; under a full CI
            # load that worker once outlived it by over a minute (after both runs completed,
            # as asserted above): its shutdown is Prefect's, so a kill ends it then
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def test_retraining_from_the_cli_fails_the_gate_rolls_back_and_refuses(project):
    # 4. the data of step 1 again (DVC's run cache restores its outputs) and an impossible gate:
    # the run is committed, prod stays, exit 3
    tags = _tags(project)
    code, out = _retrain(project, *FAST, "report.gate.min_gain_over_base=0.99")
    assert code == 3, out[-3000:]
    assert "quality gate FAIL: qlora_synthetic_qa: QLoRA gain over base" in out
    assert "qlora-adapter v0.0.2 stays in prod" in out and _tags(project) == tags
    assert _git(project, "log", "-1", "--format=%s") == "Retraining run: quality gate FAIL"

    # 5. a passing run (the data of step 3 again: DVC's run cache restores its outputs) whose
    # push fails: the promotion is taken back (transaction rollback)
    code, out = _retrain(
        project, *FAST, "data.synthetic.n_train=2200", "promotion.dvc_remote=nowhere"
    )
    assert code == 1, out[-3000:]
    assert "dvc push -r nowhere" in out
    assert _tags(project) == tags  # no v0.0.3: prod is still v0.0.2
    promoted = run_cli(project, "-m", "qlora_pipeline", "promoted")
    assert promoted.stdout.startswith("qlora-adapter v0.0.2 in prod")

    # 6. a rollback puts v0.0.1 back in prod, recorded as an assignment of its own
    back = run_cli(project, "-m", "qlora_pipeline", "rollback")
    assert back.returncode == 0 and "prod is now qlora-adapter v0.0.1" in back.stdout
    promoted = run_cli(project, "-m", "qlora_pipeline", "promoted")
    assert promoted.stdout.startswith("qlora-adapter v0.0.1 in prod")
    assert "qlora-adapter#prod#3" in _tags(project)


def test_a_dirty_work_tree_is_refused(project):
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text() + "\n")
    try:
        code, out = _retrain(project, *FAST)
        assert code == 2 and "error: the work tree has uncommitted changes (M dvc.yaml" in out
        assert "Running stage" not in out
    finally:
        _git(project, "checkout", "--", "dvc.yaml")


def test_the_evaluation_set_changes_only_by_a_recorded_reset(project):
    frozen = project / "data/frozen/test.jsonl"
    before = frozen.read_bytes()
    again = run_cli(project, "-m", "qlora_pipeline", "freeze-test", *FAST)
    assert again.returncode == 2 and "the evaluation set is already frozen" in again.stderr
    unsaid = run_cli(project, "-m", "qlora_pipeline", "freeze-test", "--reset", *FAST)
    assert unsaid.returncode == 2 and "needs -m WHY" in unsaid.stderr
    same = run_cli(project, "-m", "qlora_pipeline", "freeze-test", "--reset", "-m", "x", *FAST)
    assert same.returncode == 2 and "nothing to reset" in same.stderr
    assert frozen.read_bytes() == before

    reset = run_cli(
        project,
        "-m",
        "qlora_pipeline",
        "freeze-test",
        "--reset",
        "-m",
        "a larger test set",
        *FAST,
        "data.synthetic.n_test=60",
    )
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert _git(project, "log", "-1", "--format=%s") == (
        "Evaluation set reset: a larger test set (60 items)"
    )
    assert _git(project, "show", "--name-only", "--format=", "HEAD") == (
        "data/frozen/test.jsonl.dvc"
    )
    assert len(frozen.read_text().splitlines()) == 60
    assert _git(project, "status", "--porcelain", "--untracked-files=no") == ""
