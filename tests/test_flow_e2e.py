"""The whole DAG from the CLI: Hydra -> Prefect flow -> DVC stages -> lm-eval -> report."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, copy_project, run_cli

pytestmark = pytest.mark.slow

SECRETS = {  # fake credentials the run's environment carries
    "HF_TOKEN": "hf_FakeTokenForTheLeakTest0123456789",
    "AWS_SECRET_ACCESS_KEY": "FakeAwsSecretForTheLeakTest/0123456789",
    "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/fake-gcp-credentials-0123456789.json",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    copy_project(project)
    proc = run_cli(project, "-m", "qlora_pipeline", "run", *TINY, env=SECRETS)
    (project / "run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return project


def test_no_secret_from_the_environment_reaches_any_output(project):
    """Fake credentials in the run's environment: none of their bytes in any file the run wrote
    (outputs, manifests, run records, reports, DVC's cache and lock, Prefect's database with its
    task parameters, logs and artifacts) nor in what it printed."""
    leaked = []
    for path in project.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            source = ROOT / path.relative_to(project)
            if source.is_file() and source.read_bytes() == data:
                continue  # a file of the checkout (this test names the secrets), not an output
            leaked += [f"{path}: {k}" for k, v in SECRETS.items() if v.encode() in data]
    assert not leaked, leaked
    assert (project / ".prefect").is_dir() and (project / "run.log").is_file()  # searched


def test_report_names_both_methods_and_fine_tuning_beats_base(project):
    report = (project / "reports/report.md").read_text()
    assert "QLoRA" in report and "LoRA" in report and "paged_adamw_32bit" in report
    assert "McNemar p" in report and "no promoted version yet" in report
    assert report.splitlines()[2].startswith("> **Quality gate: ")  # the verdict banner first
    assert "pooled over seeds 0, 1; per seed " in report  # the gap, then the noise floor
    assert "- noise floor (same arm, another seed): |Δ| up to " in report
    assert "## Seeds and the noise floor" in report and "| LoRA | 1 vs 0 |" in report
    assert "## What ships (seed 0)" in report and "QLoRA adapter on the bf16 base" in report
    assert "## Merged export" in report
    assert (
        "## Quantization of the frozen base" in report and "| **nf4+dq** (configured) |" in report
    )
    html = (project / "reports/report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics["tasks"]) == {"qlora_synthetic_qa"}
    for name, task in metrics["tasks"].items():
        assert task["qlora"] > task["base"] + 0.3, name
        assert task["lora"] > task["base"] + 0.3, name
        assert task["gap_ci_low"] <= task["gap"] <= task["gap_ci_high"]
        assert task["qlora_vs_accepted"] is None
        # both arms per seed; pooled = item means over seeds, so the gap is the seeds' mean gap
        assert [s["seed"] for s in task["per_seed"]] == [0, 1]
        gaps = [s["gap"]["estimate"] for s in task["per_seed"]]
        assert task["gap"] == pytest.approx(sum(gaps) / 2)
        assert all(0 <= s["mcnemar"]["p_value"] <= 1 for s in task["per_seed"])
        floor = [abs(d["estimate"]) for arm in ("qlora", "lora") for d in task["same_arm"][arm]]
        assert len(floor) == 2 and task["noise_floor"] == max(floor)
        shipped = task["shipped"]
        assert shipped["seed"] == 0 and shipped["qlora"]["value"] == task["per_seed"][0]["qlora"]
        for form in ("merged", "qlora_on_bf16"):  # scored, with a paired interval of the drift
            drift = shipped[form]["drift"]
            assert drift["ci_low"] <= drift["estimate"] <= drift["ci_high"], form
        assert abs(shipped["merged"]["drift"]["estimate"]) <= 0.1, name  # the export keeps it
    assert metrics["verdict"] in ("PASS", "FAIL") and metrics["optimizer"]["qlora"]
    conditions = {(c["task"], c["condition"]): c for c in metrics["conditions"]}
    gain = conditions[("qlora_synthetic_qa", "QLoRA gain over base")]
    assert gain["verdict"] == "PASS" and gain["ci_low"] <= gain["estimate"] <= gain["ci_high"]
    items = (project / "reports/items.csv").read_text().splitlines()
    assert items[0] == "task,metric,doc_id,base,qlora,qlora_on_bf16,merged,lora"
    assert len(items) == 1 + 40
    rows = (project / "reports/scores.csv").read_text().splitlines()
    assert rows[0] == "task,model,score,ci_low,ci_high" and len(rows) == 1 + 3


@pytest.mark.skipif(
    not shutil.which("chromium"), reason="needs Debian's chromium (.ci/run installs it)"
)
def test_report_html_renders_in_headless_chromium(project):
    import numpy as np
    from matplotlib.image import imread
    from playwright.sync_api import sync_playwright

    shot = project / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((project / "reports/report.html").as_uri())
        scroll_width = page.evaluate("document.documentElement.scrollWidth")
        banner = page.evaluate(
            "document.body.children[1].className + ': ' + document.body.children[1].innerText"
        )
        raw_markdown = page.evaluate("document.body.innerText.includes('`')")
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        tables = page.evaluate("document.querySelectorAll('table').length")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert [alt for alt, _, _ in images] == ["gap", "scores", "loss_curves"]
    assert all(complete and width > 300 for _, complete, width in images)
    assert tables >= 5
    assert scroll_width <= 1280  # no horizontal overflow at 1280 px
    assert re.match(r"verdict (pass|fail): Quality gate: (PASS|FAIL)", banner)  # first, at the top
    assert not raw_markdown
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] > 900 and np.std(pixels) > 0.05  # not blank


def test_run_records_hold_what_differs_per_machine(project):
    """Timings, speed, memory and the environment are in runs/, never in DVC-hashed outputs."""
    runs = {p.stem: json.loads(p.read_text()) for p in (project / "runs").glob("*.json")}
    assert {
        "bootstrap",
        "prepare",
        "train@qlora-0",
        "train@lora-0",
        "train@qlora-1",
        "train@lora-1",
        "evaluate@base",
        "report",
    } <= set(runs)
    train = runs["train@qlora-0"]
    assert (
        train["tokens_per_s"] > 0 and train["wall_s"] > 0 and train["steps"][0]["tokens_per_s"] > 0
    )
    env = train["environment"]
    assert env["cpu_capability"] == "AVX2" and env["determinism"]["MKL_CBWR"] == "AVX2,STRICT"
    assert env["mkl_branch"] in ("AVX2", None)  # None: a torch without MKL
    assert env["libraries"]["torch"] and len(env["config_sha256"]) == 64
    for path in [
        project / "models/base/base.json",
        *project.glob("models/adapters/*/seed*/train_metrics.json"),
    ]:
        assert not {"wall_s", "tokens_per_s", "peak_rss_mb", "train_runtime_s"} & set(
            json.loads(path.read_text())
        )
    results = json.loads((project / "results/eval/qlora/seed1/results.json").read_text())
    assert not {"date", "pretty_env_info", "git_hash", "total_evaluation_time_seconds"} & set(
        results
    )
    report = (project / "reports/report.md").read_text()
    assert "tokens/s" in report and env["device"] in report and "## Evaluation protocol" in report


def test_qlora_footprint_is_below_lora(project):
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["footprint_mb"]["qlora"] < metrics["footprint_mb"]["lora"]


def test_flow_ran_stages_in_dvc_dag_order_and_dvc_is_clean(project):
    log = (project / "run.log").read_text()
    order = re.findall(r"dvc repro --single-item (\S+)", log)
    dot = run_cli(project, "-m", "dvc", "dag", "--dot").stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    stages = {s for edge in edges for s in edge}
    assert set(order) == stages and len(order) == len(stages)
    for upstream, downstream in edges:
        assert order.index(upstream) < order.index(downstream)
    status = run_cli(project, "-m", "dvc", "status", "--json")
    assert json.loads(status.stdout) == {}
    lock = (project / "dvc.lock").read_text()
    for stage in stages:
        assert f"{stage}:" in lock


def test_saved_adapter_reproduces_the_evaluated_outputs(project):
    """PeftModel.from_pretrained on a saved adapter gives the answers lm-eval scored; the second
    seed's, which the evaluation put on a base that had held the first seed's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter = project / "models/base", project / "models/adapters/lora/seed1"
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        # bf16 weights computed in fp32, as the pinned CPU kernels evaluate them (exact upcast)
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        adapter,
    ).eval()
    rows = [
        json.loads(line)
        for line in (project / "results/eval/lora/seed1/samples_qlora_synthetic_qa.jsonl")
        .read_text()
        .splitlines()
    ][:8]
    for row in rows:
        ids = tok(row["doc"]["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
            )
        text = (
            tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            .split("\n")[0]
            .strip()
        )
        assert text == row["filtered_resps"][0]


def _task_runs(project):
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        return db.execute("SELECT name, state_type FROM task_run").fetchall()


def test_the_run_logs_no_error_and_its_server_recorded_every_task_run(project):
    log = (project / "run.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log and "View at" not in log
    # no library's FutureWarning/UserWarning, per-log dict or notice about how we call it
    assert re.findall(r"\w+Warning: .*", log) == []
    assert "{'loss'" not in log and "kwarg is not of type" not in log
    # DVC's lines of each stage, less its hint after every one to `git add dvc.lock`
    assert log.count("Running stage '") >= 10 and log.count("Updating lock file") >= 10
    assert "To track the changes with git" not in log and "core.autostage" not in log
    runs = _task_runs(project)
    stages = len(re.findall(r"dvc repro --single-item (\S+)", log))
    assert stages >= 10 and len(runs) == stages + 2  # compose, the stages, publish
    assert {state for _, state in runs} == {"COMPLETED"}  # recorded before the server stopped
    assert (project / ".prefect" / "temporary-server.log").is_file()


def test_second_run_is_a_cache_hit(project):
    lock = (project / "dvc.lock").read_text()
    proc = run_cli(project, "-m", "qlora_pipeline", "run", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "ERROR" not in out and "Traceback" not in out  # the server stopped once it settled
    assert "Running stage" not in out
    # one `dvc status` for the run found every stage up to date: none was handed to DVC
    assert out.count("unchanged since dvc.lock (dvc status), not run") == len(
        re.findall(r"dvc repro --single-item (\S+)", (project / "run.log").read_text())
    )
    assert (project / "dvc.lock").read_text() == lock


def test_enforced_gate_fails_the_run_and_compares_with_the_acceptedrun_cli(project):
    """Accept the run (commit reports/ and dvc.lock), then gate the next one with an impossible
    retention threshold: only the report stage reruns, it compares with the accepted metrics, and
    the run exits 3."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "accept"], cwd=project, check=True, capture_output=True)
    gated = [
        *TINY,
        "report.accepted_rev=HEAD",  # a git revision instead of the promoted version
        "report.gate.enforce=true",
        "report.gate.min_retention=5",
    ]
    proc = run_cli(project, "-m", "qlora_pipeline", "run", *gated)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "error: quality gate FAIL: " in proc.stderr
    assert "qlora_synthetic_qa: retention: " in proc.stderr  # the impossible threshold, named
    assert re.findall(r"Running stage '([^']+)'", out) == ["report"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["verdict"] == "FAIL"
    assert all(t["qlora_vs_accepted"] == 0.0 for t in metrics["tasks"].values())
    assert "reports/metrics.json at HEAD" in (project / "reports/report.md").read_text()
    gate = run_cli(project, "-m", "qlora_pipeline", "gate")
    assert gate.returncode == 1 and gate.stdout.startswith("quality gate: FAIL (")


def test_dvc_exp_run_composes_conf_like_our_compose(project):
    """`dvc exp run -S` composes params.yaml from conf/ itself (DVC's Hydra support), byte for byte
    what `qlora-pipeline compose` writes; only the stage whose params changed reruns."""
    from qlora_pipeline.tracking.dvc import compose

    overrides = [*TINY, "report.title=Experiment B"]
    proc = run_cli(project, "-m", "dvc", "exp", "run", *(a for o in overrides for a in ("-S", o)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (project / "params.yaml").read_text() == compose(project, overrides)[0]
    assert re.findall(r"Running stage '([^']+)'", out) == ["report"]
    assert (project / "reports/report.md").read_text().startswith("# Experiment B")
    shown = run_cli(project, "-m", "dvc", "exp", "show", "--json")
    assert "Experiment B" in shown.stdout


def test_experiments_is_one_readable_line_per_run_and_experiment(project):
    """After `dvc exp run -S report.title=...`: the experiment's line names that change and holds
    its summary metrics, interval and verdict; DVC's own metrics are the curated headline."""
    proc = run_cli(project, "-m", "qlora_pipeline", "experiments")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["experiment", "rev", "changed", "QLoRA"]
    (row,) = [line for line in lines if "report.title=Experiment B" in line]
    summary = json.loads((project / "reports/summary.json").read_text())  # the applied experiment
    t = summary["qlora_synthetic_qa"]
    assert f"{t['qlora']:.3f}" in row and f"{t['lora']:.3f}" in row and summary["verdict"] in row
    assert f"{t['gap']:+.3f} [{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}]" in row
    assert len(lines) >= 3  # the work tree, the commit and the experiment
    shown = json.loads(run_cli(project, "-m", "dvc", "metrics", "show", "--json").stdout)
    (metrics,) = [m for rev in shown.values() for m in [rev["data"]]]
    assert list(metrics) == ["reports/summary.json"]  # not the ~70 figures of metrics.json


# --- faults: SIGKILL mid-stage, a refused write, bad input through `run` ------------------------

STAGE_OUTPUTS = {  # a stage command and the output folder it replaces
    "prepare": (["prepare"], "data/prepared"),
    "export": (["export", "qlora"], "models/export/qlora"),
    "evaluate": (["evaluate", "merged"], "results/eval/merged"),
    "report": (["report"], "reports"),
}
# The stage command, killed (SIGKILL) once it has written its whole output under the temporary
# name and before that output is put in place: the last instant a crash can hit a stage.
KILLED_STAGE = """
import contextlib, os, signal, sys
from qlora_pipeline import cli, files
from qlora_pipeline.data import prepare
from qlora_pipeline.evaluation import evaluate
from qlora_pipeline.modeling import export
from qlora_pipeline.reporting import report

real = files.atomic_dir

@contextlib.contextmanager
def killed_before_the_exchange(target):
    with real(target) as tmp:
        yield tmp
        assert any(p.is_file() for p in tmp.rglob("*")), "nothing written yet"
        os.kill(os.getpid(), signal.SIGKILL)

for module in (prepare, evaluate, export, report):
    module.atomic_dir = killed_before_the_exchange
sys.exit(cli.main(sys.argv[1:]))
"""


def _files(root):
    """Every file under `root` and its bytes' hash; the temporary folders a kill leaves beside
    outputs (dot-named, recovered by the next write) are not under a final name."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _stale(project, out):
    """Make a stage's output stale but whole, so that its command really rewrites it (prepare
    is otherwise a cache hit); its files before that."""
    before = _files(project / out)
    if out == "data/prepared":
        manifest = project / out / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"cache_key": "', '"cache_key": "x'))
    return before


@pytest.mark.parametrize("stage", list(STAGE_OUTPUTS))
def test_a_sigkilled_stage_leaves_its_output_whole_and_the_rerun_gives_the_same(project, stage):
    argv, out = STAGE_OUTPUTS[stage]
    before = _stale(project, out)
    stale = _files(project / out)
    killed = run_cli(project, "-c", KILLED_STAGE, *argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # the kill fired
    assert _files(project / out) == stale  # under its name: the old output, whole
    assert list((project / out).parent.glob(f".{Path(out).name}.tmp-*"))  # the new one, aside
    rerun = run_cli(project, "-m", "qlora_pipeline", *argv)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _files(project / out) == before  # the same result as the uninterrupted run
    assert not list((project / out).parent.glob(f".{Path(out).name}.tmp-*"))  # cleaned up


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_refused_write_is_one_line_and_leaves_the_earlier_output(project):
    """RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB (root included, unlike a read-only
    mode bit): prepare stops with one line and the earlier output is untouched."""
    before = _stale(project, "data/prepared")
    stale = _files(project / "data/prepared")
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", "prepare"],
        cwd=project,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(64 * 1024),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: data/prepared: writing it failed (File too large); it is left as it was"
    ]  # the fault fired: EFBIG, not some other failure
    assert "Traceback" not in proc.stderr
    assert _files(project / "data/prepared") == stale
    assert run_cli(project, "-m", "qlora_pipeline", "prepare").returncode == 0
    assert _files(project / "data/prepared") == before


def test_bad_input_met_by_a_stage_is_one_line_and_exit_2_from_run(project):
    """A malformed row is found by `prepare` inside the flow: `run` exits 2 with that line (the
    file and row), no traceback, no retry, and the earlier prepared data is untouched."""
    before = _files(project / "data/prepared")
    bad = project / "data/raw/bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3\n')
    tiny = [o for o in TINY if not o.startswith("data.")]  # the same base: bootstrap is cached
    overrides = [*tiny, "data=local", "data.path=data/raw/bad.jsonl", "data.max_length=64"]
    proc = run_cli(project, "-m", "qlora_pipeline", "run", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = "data/raw/bad.jsonl:2: malformed JSON (Expecting ',' delimiter at column 18); expected one JSON object per line"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {said}", f"error: stage 'prepare': {said}"]  # the stage's, run's
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Retry" not in out and "NotReady" not in out
    assert re.findall(r"Running stage '([^']+)'", out) == ["prepare"]
    assert _files(project / "data/prepared") == before
