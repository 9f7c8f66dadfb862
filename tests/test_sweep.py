"""Sweeps (`qlora-pipeline run -m ...`): every point its own workspace and DVC experiment, the
sweep report with its Pareto front, and `reproduce` on a point."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import TINY, adapter_dir, copy_project, run_cli
from safetensors import safe_open

from qlora_pipeline.reporting.sweep import MB, pareto, training_bytes
from qlora_pipeline.tracking.reproduce import output_hashes
from qlora_pipeline.tracking.sweep import grid, varying

SHORT = [  # the whole DAG in seconds of compute: what is under test is the orchestration
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
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
FLOW_RUNS = """
from prefect import get_client
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows()}
    for run in c.read_flow_runs():
        parent = c.read_task_run(run.parent_task_run_id).flow_run_id if run.parent_task_run_id else ""
        print(f"{flows[run.flow_id]}:{run.id}:{parent}")
"""


def _commit(project: Path) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=project, check=True, capture_output=True)


def test_the_grid_is_hydras_multirun_expansion():
    points = grid(
        ["seeds=[0]", "train.lora.r=8,16", "methods.qlora.quantization.quant_type=nf4,fp4"]
    )
    assert points == [
        ["seeds=[0]", "train.lora.r=8", "methods.qlora.quantization.quant_type=nf4"],
        ["seeds=[0]", "train.lora.r=8", "methods.qlora.quantization.quant_type=fp4"],
        ["seeds=[0]", "train.lora.r=16", "methods.qlora.quantization.quant_type=nf4"],
        ["seeds=[0]", "train.lora.r=16", "methods.qlora.quantization.quant_type=fp4"],
    ]
    assert varying(points)[3] == ["train.lora.r=16", "methods.qlora.quantization.quant_type=fp4"]
    assert grid(["train.lr=range(1,4)"]) == [["train.lr=1"], ["train.lr=2"], ["train.lr=3"]]


def test_the_pareto_front_is_the_points_nothing_beats_on_both():
    # (memory, quality): b and c are dominated by a (less memory, at least as good); d is the
    # best quality at more memory; e ties a exactly and so is on the front too.
    points = [(10, 0.6), (12, 0.6), (11, 0.5), (20, 0.7), (10, 0.6)]
    assert pareto(points) == [True, False, False, True, True]


def test_training_memory_is_the_tensors_of_the_trained_adapter(trained, tiny_cfg):
    """The adapter's bytes in the accounting are the bytes of the tensors the training saved."""
    metrics = json.loads((adapter_dir(tiny_cfg, "qlora") / "train_metrics.json").read_text())
    with safe_open(adapter_dir(tiny_cfg, "qlora") / "adapter_model.safetensors", "pt") as f:
        saved = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    memory = training_bytes(metrics)
    assert memory["adapter"] == saved == memory["gradients"]
    assert memory["optimizer"] == 2 * saved  # AdamW: two fp32 moments per fp32 parameter
    assert memory["weights"] == metrics["base_footprint_bytes"]
    assert memory["total"] == memory["weights"] + 4 * saved


def test_the_optuna_search_runs_its_trials_in_batches_and_its_front_is_ours(tmp_path):
    """Hydra's Optuna sweeper through our launcher: trials asked a batch at a time, each given as
    overrides of the search space, a failed one left out, and Optuna's Pareto solutions the
    points `pareto` puts on the front. Objectives: a quality per rank (rank 6 below rank 4), memory
    the planner's adapter accounting, and rank 16 fails."""
    from qlora_pipeline.modeling.plan import Shape, adapter_params
    from qlora_pipeline.tracking.sweep import optuna_search

    shape = Shape(
        vocab=384,
        hidden=128,
        intermediate=256,
        layers=2,
        heads=2,
        kv_heads=2,
        head_dim=64,
        tied=False,
    )
    batches: list[list[list[str]]] = []
    results = {}

    def launch(batch: list[list[str]]) -> list[tuple[float, float] | None]:
        batches.append(batch)
        out: list[tuple[float, float] | None] = []
        for point in batch:
            (rank,) = [int(o.split("=")[1]) for o in point if o.startswith("train.lora.r=")]
            quality = {2: 0.5, 4: 0.75, 6: 0.6, 8: 0.875}.get(rank)  # 6: below 4, at more memory
            value = None if quality is None else (quality, adapter_params(shape, rank) * 16 / MB)
            results[tuple(point)] = value
            out.append(value)
        return out

    found = optuna_search(["train.lora.r=choice(2,4,6,8,16)"], 8, 2, 0, tmp_path / "s", launch)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    done = [v for v in results.values() if v is not None]
    front = pareto([(memory, quality) for quality, memory in done])
    assert not all(front) and None in results.values()  # a dominated point and a failed one ran
    assert sorted({tuple(s["values"]) for s in found["solutions"]}) == sorted(
        {v for v, on in zip(done, front, strict=True) if on}
    )
    assert (tmp_path / "s/optimization_results.yaml").is_file()


def test_a_bad_point_is_one_line_naming_it_and_nothing_runs(tmp_path):
    copy_project(tmp_path)
    no_commit = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "-m", "train.lora.r=4,8")
    assert no_commit.returncode == 2
    assert no_commit.stderr.strip().splitlines()[-1] == (
        "error: a sweep's points are worktrees of HEAD: commit the project first"
    )
    _commit(tmp_path)
    bad = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "-m", "train.lora.r=4,many")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: sweep point train.lora.r=many: config key 'train.lora.r'")
    alone = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "--trials", "2", "seed=1")
    assert alone.returncode == 2 and alone.stderr.strip().splitlines()[-1] == (
        "error: --sweep-name, --trials and --keep belong to a sweep: add -m"
    )
    nothing = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "-m", "--trials", "2", "seed=1")
    assert nothing.returncode == 2
    assert nothing.stderr.strip().splitlines()[-1].startswith("error: --trials: no search axis")
    assert not (tmp_path / ".dvc/tmp/sweeps").exists()


@pytest.mark.slow
def test_a_2x2_sweep_runs_isolated_points_reports_them_and_reproduces_one(tmp_path):
    """One command: four points, two at a time, each in its own workspace with its own params
    and outputs (none written twice, none in the checkout), each a flow run under the sweep's and
    a DVC experiment listed by `experiments` and `dvc exp show`; the stages they share computed
    once; the sweep report opens in headless Chromium; an Optuna search over the same space; and
    one point, recomputed from nothing, gives the same bytes."""
    copy_project(tmp_path)
    _commit(tmp_path)
    axes = ["train.lora.r=4,8", "methods.qlora.quantization.quant_type=nf4,fp4"]
    sweep = ["run", "-m", "--sweep-name", "sw", "--keep", *SHORT, "orchestration.slots=2", *axes]
    proc = run_cli(tmp_path, "-m", "qlora_pipeline", *sweep)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    names = ["sw-1", "sw-2", "sw-3", "sw-4"]
    works = [tmp_path / ".dvc/tmp/sweeps/sw" / n for n in names]
    expected = [(4, "nf4"), (4, "fp4"), (8, "nf4"), (8, "fp4")]

    # Isolation: each point's params and outputs are its own; the checkout got none.
    for work, (r, quant) in zip(works, expected, strict=True):
        params = yaml.safe_load((work / "params.yaml").read_text())
        assert params["train"]["lora"]["r"] == r
        assert params["methods"]["qlora"]["quantization"]["quant_type"] == quant
        adapter = work / "models/adapters/qlora/seed0"
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == r
        trained = json.loads((adapter / "train_metrics.json").read_text())
        assert trained["quantization"]["quant_type"] == quant and trained["lora"]["r"] == r
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvc.lock").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, capture_output=True)
    assert status.stdout.decode().split() == ["??", "sweeps/"]  # the sweep report only
    # Shared stages ran once (their record is in one point); the others restored them.
    assert [(w / "runs/bootstrap.json").exists() for w in works] == [True, False, False, False]
    lora_ran = [(w / "runs/train@lora-0.json").exists() for w in works]  # r=4 in 1, r=8 in 3 or 4
    assert lora_ran[:2] == [True, False] and any(lora_ran[2:])
    # The last three points ran two at a time: some of their stages overlapped in time.
    spans = []
    for work in works[1:]:
        records = [json.loads(p.read_text()) for p in (work / "runs").glob("*.json")]
        spans.append(
            (
                min(datetime.fromisoformat(r["started_at"]) for r in records),
                max(datetime.fromisoformat(r["finished_at"]) for r in records),
            )
        )
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])

    # Every point is a flow run of its own under the one sweep flow run (through its task run).
    runs = run_cli(tmp_path, "-c", FLOW_RUNS).stdout.split()
    (sweep_run,) = [r for r in runs if r.startswith("qlora-sweep:")]
    points = [r for r in runs if r.startswith("qlora-pipeline:")]
    assert len(points) == 4 and all(p.split(":")[2] == sweep_run.split(":")[1] for p in points)

    # Every point is a DVC experiment: `dvc exp show` and `experiments` list them.
    shown = json.loads(run_cli(tmp_path, "-m", "dvc", "exp", "show", "--json").stdout)
    listed = {rev["name"] for c in shown for e in c.get("experiments") or [] for rev in e["revs"]}
    assert listed == set(names)
    table = run_cli(tmp_path, "-m", "qlora_pipeline", "experiments").stdout.splitlines()
    for name, (r, quant) in zip(names, expected, strict=True):
        (line,) = [t for t in table if t.startswith(name + " ")]
        assert f"train.lora.r={r}" in line
        assert (f"methods.qlora.quantization.quant_type={quant}" in line) == (quant == "fp4")
        assert "eval.limit" not in line  # what every point sets is said once, under the table
    assert table[-1].startswith("every experiment on ") and "eval.limit=8" in table[-1]

    # The sweep report: a row per point, the Pareto plot embedded, readable in Chromium.
    report = tmp_path / "sweeps/sw"
    rows = json.loads((report / "sweep.json").read_text())
    assert [r["name"] for r in rows] == names
    adapters = [r["memory"]["adapter"] for r in rows]
    assert adapters[2:] == [2 * a for a in adapters[:2]]  # rank 8 adapters are twice rank 4's
    md = (report / "sweep.md").read_text()
    assert md.count("\n| sw-") == 4 and "![pareto](pareto.png)" in md
    if shutil.which("chromium"):
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((report / "sweep.html").as_uri())
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
            )
            cells = page.evaluate("document.querySelectorAll('tbody tr').length")
            browser.close()
        assert images == [["pareto", True, 704]] and cells == 4

    taken = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "-m", "--sweep-name", "sw", *axes)
    assert taken.returncode == 2 and taken.stderr.strip().splitlines()[-1].startswith(
        "error: --sweep-name sw: experiment sw-1 exists"
    )

    # A search instead of a grid, end to end: one trial Hydra's Optuna sweeper asks for runs as a
    # point (every stage restored from the run cache: the grid computed it); Optuna's solution is it.
    search = ["--sweep-name", "op", "--trials", "1", *SHORT, "orchestration.slots=2"]
    proc = run_cli(
        tmp_path, "-m", "qlora_pipeline", "run", "-m", *search, "train.lora.r=choice(4,8)"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (row,) = json.loads((tmp_path / "sweeps/op/sweep.json").read_text())
    (rank,) = [int(o.split("=")[1]) for o in row["overrides"] if o.startswith("train.lora.r=")]
    assert row["name"] == "op-1" and row["train"]["lora"]["r"] == rank and rank in (4, 8)
    (solution,) = yaml.safe_load((tmp_path / "sweeps/op/optimization_results.yaml").read_text())[
        "solutions"
    ]
    assert solution["values"] == [row["figures"]["qlora"], row["memory"]["total"] / MB]

    # One point recomputed from nothing gives its recorded bytes.
    again = run_cli(tmp_path, "-m", "qlora_pipeline", "reproduce", "sw-4")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-3000:]
    lock = (works[3] / "dvc.lock").read_text()
    assert f"identical: all {len(output_hashes(lock))} outputs of " in again.stdout
    stages = set(yaml.safe_load(lock)["stages"])
    assert set(re.findall(r"Running stage '([^']+)'", said)) == stages  # every stage ran again
    assert "restored from run-cache" not in said and "is cached - skipping" not in said
    assert not list((tmp_path / ".dvc/tmp/reproduce").glob("*"))  # its workspace is removed
    bad = run_cli(tmp_path, "-m", "qlora_pipeline", "reproduce", "no-such-run")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: no-such-run: neither a git revision nor a DVC experiment "
        "(`qlora-pipeline experiments`)"
    )
