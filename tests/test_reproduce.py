"""`qlora-pipeline reproduce`: a committed run recomputed from nothing gives the same bytes, and
what it says when outputs move."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from conftest import TINY, copy_project, run_cli

from qlora_pipeline.tracking.reproduce import environment_changes, output_hashes, score_moves

SHORT = [  # the whole DAG in seconds of compute: what is under test is the recomputation
    *TINY,
    "seeds=[0]",
    "model.bootstrap.steps=30",
    "model.bootstrap.corpus_lines=2000",
    "data.synthetic.n_train=200",
    "data.synthetic.n_test=16",
    "train.max_steps=8",
    "train.eval_steps=null",
    "train.save_steps=null",
    "eval.limit=8",
]


@pytest.mark.slow
def test_a_committed_run_is_recomputed_from_nothing_bitwise(tmp_path):
    """`reproduce HEAD` recomputes the committed run in a clean worktree: every stage runs again
    (forced, DVC's run cache off, nothing restored) and the outputs are the recorded bytes."""
    from pipelines import flow

    copy_project(tmp_path)
    assert flow.pipeline_flow(str(tmp_path), SHORT, return_state=True).is_completed()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "run"], cwd=tmp_path, check=True, capture_output=True)

    proc = run_cli(tmp_path, "-m", "qlora_pipeline", "reproduce", "HEAD")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lock = (tmp_path / "dvc.lock").read_text()
    assert f"identical: all {len(output_hashes(lock))} outputs of " in proc.stdout
    stages = set(yaml.safe_load(lock)["stages"])
    assert set(re.findall(r"Running stage '([^']+)'", out)) == stages  # every stage ran again
    assert "restored from run-cache" not in out and "is cached - skipping" not in out
    assert not list((tmp_path / ".dvc/tmp/reproduce").glob("*"))  # the workspace is removed
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True)
    assert status.stdout == b""  # the checkout is as it was
    bad = run_cli(tmp_path, "-m", "qlora_pipeline", "reproduce", "no-such-run")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: no-such-run: neither a git revision nor a DVC experiment "
        "(`qlora-pipeline experiments`)"
    )


def test_what_moved_is_said_against_the_noise_floor():
    lock = "stages:\n  a:\n    outs:\n    - path: x\n      md5: 1\n    - path: y\n      md5: 2\n"
    assert output_hashes(lock) == {"x": "1", "y": "2"}
    assert environment_changes(
        {"cpu": "AMD", "torch": "2.13"}, {"cpu": "Intel", "torch": "2.13"}
    ) == ["cpu: AMD -> Intel"]
    moves = score_moves(
        {"t": {"qlora": 0.60, "lora": 0.62, "gap": -0.02, "noise_floor": 0.10}},
        {"t": {"qlora": 0.65, "lora": 0.62, "gap": 0.03, "noise_floor": 0.12}},
    )
    assert moves[0] == "t qlora: 0.6000 -> 0.6500 (+0.0500, 0.50x the noise floor 0.100)"
    assert moves[2].startswith("t gap: -0.0200 -> 0.0300 (+0.0500, 0.50x")
