"""The unattended retraining flow in a scratch clone: a promotion per passing run, a no-op when
nothing changed, new data retrains and is compared paired with the promoted version, a forced
FAIL leaves prod alone, and a failed push takes the promotion back (Prefect transaction)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import TINY, copy_project, run_cli

pytestmark = pytest.mark.slow

# A short run whose gate decides on the gain over base only (the flow is under test here, not the
# tiny model: on n=40 items the other conditions are noise): one seed, short training, margins 1.
FAST = [
    *TINY,
    "seeds=[0]",
    "train.max_steps=200",
    "train.eval_steps=null",
    "train.save_steps=null",
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
    _git(project, "add", "-A")
    _git(project, "-c", "user.name=dev", "-c", "user.email=dev@x", "commit", "-qm", "clone")
    return project


def test_retraining_promotes_skips_retrains_and_refuses(project):
    # 1. the first run: everything runs, the run is committed, v0.0.1 goes to prod
    code, out = _retrain(project, *FAST)
    assert code == 0, out[-3000:]
    assert "promoted qlora-adapter v0.0.1 (before: nothing)" in out
    assert _tags(project) == ["qlora-adapter#prod#1", "qlora-adapter@v0.0.1"]
    author = _git(project, "log", "-1", "--format=%an <%ae> %s")
    assert author == "qlora-pipeline <qlora-pipeline@localhost> Retraining run: quality gate PASS"
    first = _git(project, "rev-parse", "HEAD")
    assert _git(project, "status", "--porcelain", "--untracked-files=no") == ""

    # 2. nothing changed: no stage runs, nothing is committed or tagged. The promotion changed the
    # report's input (report.accepted_rev is pinned to the version in prod), but the models are
    # the ones already judged: no report either, and params.yaml is left as committed.
    code, out = _retrain(project, *FAST)
    assert code == 0, out[-3000:]
    assert "no-op: data, config and code unchanged; qlora-adapter v0.0.1 stays in prod" in out
    assert "Running stage" not in out
    assert _git(project, "rev-parse", "HEAD") == first and len(_tags(project)) == 2
    assert _git(project, "status", "--porcelain", "--untracked-files=no") == ""

    # 3. new data: prepare and everything downstream rerun, compared paired with v0.0.1
    code, out = _retrain(project, *FAST, "data.synthetic.n_train=2200")
    assert code == 0, out[-3000:]
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran[0] == "prepare" and "bootstrap" not in ran and "report" in ran
    assert "promoted qlora-adapter v0.0.2 (before: qlora-adapter v0.0.1)" in out
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert "qlora-adapter@v0.0.1" in metrics["accepted"]
    assert metrics["tasks"]["qlora_synthetic_qa"]["vs_accepted"]["paired"] is True

    # 4. new data and an impossible gate: the run is committed, prod stays, exit 3
    tags = _tags(project)
    code, out = _retrain(
        project, *FAST, "data.synthetic.n_train=2300", "report.gate.min_gain_over_base=0.99"
    )
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


def test_a_dirty_work_tree_is_refused(project):
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text() + "\n")
    try:
        code, out = _retrain(project, *FAST)
        assert code == 2 and "error: the work tree has uncommitted changes (M dvc.yaml" in out
        assert "Running stage" not in out
    finally:
        _git(project, "checkout", "--", "dvc.yaml")
