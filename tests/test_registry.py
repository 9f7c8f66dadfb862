"""The model registry: GTO tags made only from a committed run whose gate says PASS; what is in
prod, the history, and rollbacks, through the CLI in a scratch git repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qlora_pipeline.cli import main

GIT = ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com"]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


def _commit_run(root: Path, verdict: str, gap: float) -> str:
    """A run as the flow leaves it: its report committed."""
    task = {
        "gap": gap,
        "gap_ci_low": gap - 0.04,
        "gap_ci_high": gap + 0.04,
        "noise_floor": 0.07,
        "shipped": {"qlora": {"value": 0.6 + gap, "stderr": 0.03}},
    }
    reasons = [] if verdict == "PASS" else ["t: QLoRA gain over base: does not hold"]
    (root / "reports/metrics.json").write_text(
        json.dumps({"verdict": verdict, "reasons": reasons, "tasks": {"t": task}})
    )
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", f"run {gap}")
    return _git(root, "rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    _git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    for key, value in (("NAME", "ci"), ("EMAIL", "ci@example.com")):
        monkeypatch.setenv(f"GIT_AUTHOR_{key}", value)
        monkeypatch.setenv(f"GIT_COMMITTER_{key}", value)
    return tmp_path


def _tags(root: Path) -> list[str]:
    return _git(root, "tag").split()


def test_only_a_passing_committed_run_is_promoted(repo, capsys):
    _commit_run(repo, "FAIL", -0.2)
    assert main(["promote"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not promoted: the quality gate at HEAD says FAIL (t: QLoRA gain")
    assert _tags(repo) == [] and main(["promoted"]) == 1
    first = _commit_run(repo, "PASS", 0.01)
    (repo / "reports/metrics.json").write_text("{}")  # someone's uncommitted change
    assert main(["promote"]) == 2
    assert "uncommitted changes (M reports/metrics.json" in capsys.readouterr().err
    assert _tags(repo) == []
    _git(repo, "checkout", "--", "reports/metrics.json")
    assert main(["promote"]) == 0
    assert "promoted HEAD as qlora-adapter v0.0.1 (prod)" in capsys.readouterr().out
    assert _tags(repo) == ["qlora-adapter#prod#1", "qlora-adapter@v0.0.1"]
    assert _git(repo, "rev-list", "-n1", "qlora-adapter@v0.0.1").strip() == first
    assert main(["promote"]) == 2  # the same commit twice
    assert "already in prod as v0.0.1" in capsys.readouterr().err
    assert main(["promoted"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qlora-adapter v0.0.1 in prod since ")
    assert f"commit {first}" in out and "gate PASS" in out
    assert "t: QLoRA 0.610 shipped; QLoRA − LoRA +0.010 [-0.030, +0.050] pooled" in out
    assert "noise floor 0.070" in out


def test_history_and_rollback_move_prod_and_record_it(repo, capsys):
    _commit_run(repo, "PASS", 0.01)
    assert main(["promote"]) == 0
    _commit_run(repo, "PASS", 0.03)
    assert main(["promote", "-m", "new data"]) == 0
    capsys.readouterr()
    assert main(["history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["v0.0.1", "v0.0.2"]
    assert lines[1].endswith("<- prod") and not lines[0].endswith("<- prod")
    assert main(["rollback"]) == 0
    assert capsys.readouterr().out.strip() == "prod is now qlora-adapter v0.0.1"
    assert main(["promoted"]) == 0 and "v0.0.1 in prod" in capsys.readouterr().out
    assert "qlora-adapter#prod#3" in _tags(repo)  # a rollback is an assignment, recorded
    assert main(["rollback", "--to", "v0.0.2"]) == 0
    assert main(["rollback", "--to", "v9.9.9"]) == 2
    assert "unknown version v9.9.9; registered: v0.0.1, v0.0.2" in capsys.readouterr().err
    assert main(["rollback"]) == 0 and main(["rollback"]) == 2
    assert "v0.0.1 is the first version: no earlier one" in capsys.readouterr().err
