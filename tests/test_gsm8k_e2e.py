"""A real dataset end to end: a small GSM8K subset through the whole flow with the tiny model.

The tiny model learns nothing there (it scores ~0): the test checks the flow, the answer
extraction and the report on real text, and that the gate says FAIL. GSM8K items are longer than
the tiny model's 128 positions, so it is bootstrapped with a longer context, and evaluated
zero-shot. Reads ../shared/datasets/gsm8k (tests may; the product does not).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY, copy_project, run_cli

pytestmark = pytest.mark.slow

GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k"
SMALL = [o for o in TINY if not o.startswith("data.")] + [
    "data=gsm8k",
    "eval=gsm8k",
    "seeds=[0]",  # the flow on real text; one seed is enough (and says: no noise floor)
    "model.bootstrap.max_position_embeddings=1024",
    "model.bootstrap.steps=30",
    "train.max_steps=10",
    "train.eval_steps=null",
    "train.save_steps=null",
    "eval.limit=8",
    "eval.max_gen_toks=24",
    "eval.batch_size=8",
]


@pytest.fixture(scope="module")
def gsm8k_project(tmp_path_factory):
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip("../shared/datasets/gsm8k is not here")
    project = tmp_path_factory.mktemp("gsm8k")
    copy_project(project)
    raw = project / "data/raw/gsm8k"
    raw.mkdir(parents=True)
    for split, n in (("train", 120), ("test", 16)):
        lines = (GSM8K / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (raw / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_cli(project, "-m", "qlora_pipeline", "run", *SMALL)
    (project / "run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return project


def test_gsm8k_runs_end_to_end_and_the_gate_fails(gsm8k_project: Path):
    metrics = json.loads((gsm8k_project / "reports/metrics.json").read_text())
    task = metrics["tasks"]["qlora_gsm8k"]
    assert task["metric"] == "exact_match,strict-match" and task["n"] == 8
    assert metrics["verdict"] == "FAIL"  # the tiny model gains nothing on GSM8K
    assert any("gain over base" in r for r in metrics["reasons"])
    report = (gsm8k_project / "reports/report.md").read_text()
    assert "qlora_gsm8k" in report and "Quality gate: FAIL" in report
    assert "noise floor: not measured (one training seed" in report


def test_gsm8k_answers_are_extracted_as_lm_eval_does(gsm8k_project: Path):
    rows = [
        json.loads(x)
        for x in (gsm8k_project / "results/eval/qlora/seed0/samples_qlora_gsm8k.jsonl")
        .read_text()
        .splitlines()
    ]
    filters = {r["filter"] for r in rows}
    assert filters == {"strict-match", "flexible-extract"}  # one row per item and filter
    first = next(r for r in rows if r["doc_id"] == 0 and r["filter"] == "strict-match")
    assert first["target"].endswith("#### 18")  # Janet's ducks: the full solution is the target
    for r in rows:
        if r["filter"] == "strict-match" and "####" not in r["resps"][0][0]:
            assert r["filtered_resps"][0] == "[invalid]"  # lm-eval's strict extraction
    with open(gsm8k_project / "reports/items.csv", newline="") as f:
        items = list(csv.DictReader(f))
    assert len(items) == 8 and {r["metric"] for r in items} == {"exact_match,strict-match"}
    manifest = json.loads((gsm8k_project / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["test"]["read"] == 16
