"""Config: every group composes and validates; params.yaml stays in sync; bad input names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_project, run_cli

from qlora_pipeline.config.schema import validate_dict
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.tracking.dvc import compose

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model=llama-3.2-1b"],
        ["data=local", "data.path=some.jsonl"],
        ["data=chat"],
        ["data=sharegpt"],
        ["data=hub", "data.hub_config=default"],
        ["data=text"],
        ["methods.qlora.quantization.quant_type=fp4", "train.lora.target_modules=[q_proj,v_proj]"],
    ],
    ids=["default", "hub-model", "local", "chat", "sharegpt", "hub", "text", "fp4-qv"],
)
def test_every_config_group_composes_and_validates(overrides):
    _, cfg = compose(ROOT, overrides)
    assert set(cfg.methods) == {"qlora", "lora"}
    assert cfg.methods["qlora"].quantization is not None


def test_params_yaml_is_in_sync_with_conf():
    text, _ = compose(ROOT, [])
    assert (ROOT / "params.yaml").read_text(encoding="utf-8") == text, (
        "params.yaml is stale: run `qlora-pipeline compose` (make params)"
    )


def test_qlora_is_lora_plus_quantization_only():
    _, cfg = compose(ROOT, [])
    q, lo = vars(cfg.methods["qlora"]).copy(), vars(cfg.methods["lora"]).copy()
    assert q.pop("quantization") is not None and lo.pop("quantization") is None
    assert q.pop("name") == "qlora" and lo.pop("name") == "lora"
    assert q == lo
    assert cfg.methods["qlora"].quantization.quant_type == "nf4"
    assert cfg.methods["qlora"].quantization.double_quant is True


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.bogus=1"], "bogus"),
        (["methods.qlora.quantization.quant_type=int3"], "methods.qlora.quantization.quant_type"),
        (["model.bootstrap.hidden_size=100"], "model.bootstrap.hidden_size"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.lr=fast"], "train.lr"),
        (["data=local", "data.path=null"], "data.path"),
        (["data.format=alpacca"], "data.format"),
        (["data.template=llama9"], "data.template"),
        (["data.columns={answer: a}"], "data.columns.answer"),
        (["data.splits={dev: x}"], "data.splits.dev"),
        (["data.length_policy=chop"], "data.length_policy"),
        (["data.synthetic.skills=[reverse,fly]"], "data.synthetic.skills"),
        (["orchestration.slots=0"], "orchestration.slots"),
        (["orchestration.retry_delays_s=[]"], "orchestration.retry_delays_s"),
        (["orchestration.gpu_memory_gb=0"], "orchestration.gpu_memory_gb"),
        (["paths.data=data"], "paths.data"),  # would contain data/raw
        (["paths.base=src/models"], "paths.base"),
        (["paths.eval=conf"], "paths.eval"),
        (["paths.report=/tmp/reports"], "paths.report"),  # outside the project and the roots
        (["paths.output_roots=[/scratch]", "paths.report=/tmp/reports"], "paths.report"),
        (["paths.output_roots=[scratch]"], "paths.output_roots[0]"),
        (["paths.runs=../runs"], "paths.runs"),
        (["paths.exports=."], "paths.exports"),  # the project itself
        (["paths.runs=reports"], "paths.runs"),  # another output's folder
        (["data=local", "data.path=data/incoming", "paths.data=data/incoming"], "paths.data"),
        (["train.lora.init=loftq"], "train.lora.init"),  # the LoRA arm has no 4-bit base
        (["train.lora.dropout=1.5"], "train.lora.dropout"),
        (["data.val_fraction=0.7"], "data.val_fraction"),
        (["methods.qlora.quantization=null"], "methods.qlora.quantization"),
        (["methods.qlora.optimizer=sgd"], "methods.qlora.optimizer"),
        (["methods.lora.base_dtype=int8"], "methods.lora.base_dtype"),
        (["runtime.cpu_kernels=fastest"], "runtime.cpu_kernels"),
        (["seeds=[0,0]"], "seeds"),
        (["train.logging_steps=3", "train.save_steps=10"], "train.save_steps"),  # not a multiple
        (["train.max_steps=3", "train.logging_steps=5"], "train.logging_steps"),  # no log step
        (["eval.tasks=[qlora_nope]"], "eval.tasks"),
        (["eval.tasks_dir=no/such/tasks"], "eval.tasks_dir"),
        (["report.gate.tasks=[hellaswag]"], "report.gate.tasks"),  # not an evaluated task
        (["model.source=pretrained", "model.path=./no/such/model"], "model.path"),
        (["model.source=pretrained", "model.path=null"], "model.path"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(ROOT, overrides)
    message = str(err.value)
    assert key in message
    assert "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU-only option on CPU")
def test_a_gpu_only_option_is_refused_at_compose_time_on_a_cpu():
    """LoftQ on two quantized arms would be valid on a GPU; here it stops before anything runs."""
    with pytest.raises(ConfigError, match=r"'train\.lora\.init': loftq runs on CUDA only"):
        compose(ROOT, ["method@methods.lora=qlora", "train.lora.init=loftq"])


def test_harness_tasks_are_known_without_indexing_them():
    _, cfg = compose(ROOT, ["eval.tasks=[qlora_synthetic_qa,hellaswag,arc_easy]"])
    assert cfg.eval.tasks == ["qlora_synthetic_qa", "hellaswag", "arc_easy"]


def test_outputs_may_go_to_a_configured_scratch_disk():
    _, cfg = compose(
        ROOT, ["paths.output_roots=[/scratch/qlora]", "paths.eval=/scratch/qlora/eval"]
    )
    assert cfg.paths.eval == "/scratch/qlora/eval"


def test_unknown_top_level_key_is_rejected():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["trian"] = {"max_steps": 3}
    with pytest.raises(ConfigError, match="trian"):
        validate_dict(raw)


def test_cli_bad_override_is_one_line_and_leaves_params_untouched(tmp_path):
    before = (ROOT / "params.yaml").read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_pipeline",
            "run",
            "methods.qlora.quantization.quant_type=int3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config key 'methods.qlora.quantization.quant_type'")
    assert "Traceback" not in proc.stderr
    assert (ROOT / "params.yaml").read_bytes() == before


def test_an_output_over_the_users_data_is_refused_before_anything_runs(tmp_path):
    """`run paths.data=data` (a plausible typo) once replaced data/ whole, data/raw/ with it."""
    copy_project(tmp_path)
    params = (tmp_path / "params.yaml").read_bytes()
    mine = tmp_path / "data/raw/mine.jsonl"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text('{"instruction": "a", "output": "b"}\n')
    proc = run_cli(tmp_path, "-m", "qlora_pipeline", "run", "paths.data=data")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: config key 'paths.data': 'data' overlaps the input 'data/raw'; an output folder "
        "is replaced whole, so it must not equal, contain or sit inside what the pipeline reads"
    ]
    assert mine.read_text() == '{"instruction": "a", "output": "b"}\n'
    assert (tmp_path / "params.yaml").read_bytes() == params
    assert not (tmp_path / "models").exists()


def test_cli_help_explains_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for word in ("run", "compose", "bootstrap", "prepare", "train", "evaluate", "report", "Hydra"):
        assert word in proc.stdout


@pytest.mark.parametrize(
    ("params", "code", "said"),
    [("params.yaml", 0, "quality gate: PASS"), ("no-such.yaml", 2, "error: ")],
)
def test_a_command_line_ends_with_its_code_its_exit_handlers_run_and_output_flushed(
    params, code, said
):
    """`cli.end`: the process ends inside `main` (no interpreter teardown), after the exit
    handlers, with what it printed to a pipe (block-buffered) flushed."""
    script = (
        "import atexit, sys; atexit.register(print, 'exit handler ran'); "
        f"sys.argv = ['qlora-pipeline', '--params', {params!r}, 'gate']; "
        "from qlora_pipeline.cli import main; main(); print('after main')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code
    assert said in proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit handler ran"
    assert "after main" not in proc.stdout


def test_the_schedule_is_validated_with_one_line_naming_file_and_key(tmp_path):
    from pipelines.serve import load_schedule

    default = load_schedule(ROOT, "default")
    assert (default.name, default.cron, default.timezone) == ("weekly", "0 3 * * 1", "UTC")
    folder = tmp_path / "conf/schedule"
    folder.mkdir(parents=True)
    (folder / "bad.yaml").write_text("cron: every monday\n")
    with pytest.raises(ConfigError, match=r"conf/schedule/bad\.yaml: key 'cron': ") as err:
        load_schedule(tmp_path, "bad")
    assert "\n" not in str(err.value)
    (folder / "typo.yaml").write_text("crn: '0 3 * * 1'\n")
    with pytest.raises(ConfigError, match=r"conf/schedule/typo\.yaml: key 'crn': "):
        load_schedule(tmp_path, "typo")
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such schedule; .*\['bad', 'typo'\]"):
        load_schedule(tmp_path, "nope")
