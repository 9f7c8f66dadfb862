"""Training depth: every option reaches the loaded modules; a SIGKILLed run resumes to the same
adapter, bitwise; a NaN loss stops with the last good checkpoint kept; per-step metrics."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import adapter_dir, conf_default
from omegaconf import OmegaConf
from safetensors.torch import load_file

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.device import inputs_for
from qlora_pipeline.modeling.load import attach_lora, load_adapted, load_base
from qlora_pipeline.training.train import train, training_arguments


def _cfg(tiny_cfg, tmp_path, **train):
    cfg = copy.deepcopy(tiny_cfg)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cfg.paths.adapters = str(tmp_path / "adapters")
    cfg.paths.checkpoints = str(tmp_path / "checkpoints")
    return cfg


def test_quantization_options_reach_the_modules(tiny_cfg, tiny_base):
    import bitsandbytes as bnb

    method = copy.deepcopy(tiny_cfg.methods["qlora"])
    q = method.quantization
    q.quant_type, q.double_quant, q.quant_storage = "fp4", False, "bfloat16"
    q.skip_modules = ["lm_head", "down_proj"]
    model = load_base(tiny_base, method)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    state = layer.self_attn.q_proj.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16  # packed 4-bit stored as bf16
    assert type(layer.mlp.down_proj) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear


def test_lora_options_reach_the_modules(tiny_cfg, tiny_base):
    lora = conf_default(
        "train.lora",
        r=8,
        alpha=16,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "v_proj"],
    )
    model = attach_lora(
        load_base(tiny_base, tiny_cfg.methods["qlora"]), lora, tiny_cfg.methods["qlora"], 0, True
    )
    wrapped = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert set(wrapped) == {"q_proj", "v_proj"}
    layer = wrapped["q_proj"]
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA
    assert "default" in layer.lora_magnitude_vector  # DoRA
    assert model.base_model.model.is_gradient_checkpointing


def test_invalid_target_names_fail_before_training(tiny_cfg, tiny_base):
    base = load_base(tiny_base, tiny_cfg.methods["lora"])
    lora = conf_default("train.lora", target_modules=["qproj"])
    with pytest.raises(
        PipelineError, match=r"no linear layer named \['qproj'\]; the model has \[.*'q_proj'"
    ):
        attach_lora(base, lora, tiny_cfg.methods["lora"], 0)


@pytest.mark.gpu
def test_loftq_starts_from_the_quantization_error(tiny_cfg, tiny_base):
    from qlora_pipeline.modeling.load import base_source

    method = tiny_cfg.methods["qlora"]
    plain = attach_lora(load_base(tiny_base, method), conf_default("train.lora"), method, 0)
    loftq = attach_lora(
        load_base(tiny_base, method),
        conf_default("train.lora", init="loftq"),
        method,
        0,
        False,
        base_source(tiny_base)[0],
    )
    b_plain = next(
        m.lora_B["default"].weight for _, m in plain.named_modules() if hasattr(m, "lora_B")
    )
    b_loftq = next(
        m.lora_B["default"].weight for _, m in loftq.named_modules() if hasattr(m, "lora_B")
    )
    assert b_plain.abs().max() == 0 and b_loftq.abs().max() > 0


def test_the_train_stage_logs_the_packing_hint_when_its_data_calls_for_it(
    tiny_cfg, tiny_base, tiny_data, tmp_path, monkeypatch, caplog
):
    from qlora_pipeline.runtime import log
    from qlora_pipeline.training import train as train_mod

    def run(name: str) -> None:
        (tmp_path / name).mkdir()
        cfg = _cfg(tiny_cfg, tmp_path / name, max_steps=5, eval_steps=None, save_steps=None)
        train(cfg, "lora", 0, tiny_base, tiny_data, tmp_path / name / "out")

    caplog.set_level(logging.INFO, logger=log.name)
    log.addHandler(caplog.handler)  # the pipeline's logger does not propagate
    try:
        run("quiet")
        assert "data.packing=true" not in caplog.text  # the default data: no hint
        monkeypatch.setattr(train_mod, "PACKING_PAYS", 0.5)  # as if its rows were long-tailed
        run("hinted")
    finally:
        log.removeHandler(caplog.handler)
    assert "train[lora seed 0]: padded batches of 16 here are about 0% padding" in caplog.text


@pytest.mark.parametrize("variant", ["dora", pytest.param("loftq", marks=pytest.mark.gpu)])
def test_dora_and_loftq_variants_train_and_reload(
    tiny_cfg, tiny_base, tiny_data, tiny_tokenizer, tmp_path, variant
):
    cfg = _cfg(tiny_cfg, tmp_path, max_steps=20, eval_steps=None, save_steps=None)
    cfg.train.lora = conf_default(
        "train.lora", use_dora=variant == "dora", init="loftq" if variant == "loftq" else "default"
    )
    metrics = train(cfg, "qlora", 0, tiny_base, tiny_data, tmp_path / "out")
    assert metrics["steps"] == 20 and metrics["lora"]["use_dora"] == (variant == "dora")
    saved = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert saved["use_dora"] == (variant == "dora")
    first = load_adapted(tiny_base, cfg.methods["qlora"], tmp_path / "out")
    again = load_adapted(tiny_base, cfg.methods["qlora"], tmp_path / "out")
    batch = tiny_tokenizer(["<s>Q: sort c a b\nA:"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(
            first(**inputs_for(first, batch)).logits,
            again(**inputs_for(again, batch)).logits,
            rtol=0,
            atol=0,
        )
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n, _ in first.named_parameters())


def test_step_metrics_and_eval_loss_are_logged(trained, tiny_cfg):
    out = adapter_dir(tiny_cfg, "qlora")
    rows = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 301, 5))
    assert all(
        "grad_norm" in r and set(r) <= {"step", "loss", "learning_rate", "grad_norm"}
        for r in train_rows
    )
    assert [r["step"] for r in rows if "eval_loss" in r] == [100, 200, 300]
    # removed once the adapter is out
    assert not Path(tiny_cfg.paths.checkpoints, "qlora", "seed0").exists()
    args = training_arguments(_cfg(tiny_cfg, out, report_to=["tensorboard"]), "qlora", 0, out)
    assert args.report_to == ["tensorboard"] and args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }


def test_training_shows_a_progress_bar_with_the_loss_not_a_dict_per_step(
    tiny_cfg, tiny_base, tiny_data, tmp_path, capfd, monkeypatch
):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = _cfg(tiny_cfg, tmp_path, max_steps=6, logging_steps=1, eval_steps=3, save_steps=None)
    train(cfg, "lora", 0, tiny_base, tiny_data, tmp_path / "adapter")
    out, err = capfd.readouterr()
    assert "6/6" in err and "loss=" in err  # the bar, with the latest loss beside it
    assert "'loss'" not in out + err and "'eval_loss'" not in out + err
    rows = (tmp_path / "adapter/steps.jsonl").read_text().splitlines()
    assert len(rows) == 6 + 2  # every step and both evals are still logged, to steps.jsonl


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_cfg, tiny_base, tiny_data, tmp_path
):
    cfg = _cfg(
        tiny_cfg, tmp_path, max_steps=40, lr=1e30, save_steps=2, logging_steps=1, eval_steps=None
    )
    with pytest.raises(
        PipelineError,
        match=r"train\[lora seed 0\]: loss is (nan|inf) at step (\d+); stopped\. Last good checkpoint kept: .*checkpoint-\d+",
    ) as err:
        train(cfg, "lora", 0, tiny_base, tiny_data, tmp_path / "out")
    bad_step = int(str(err.value).split(" at step ")[1].split(";")[0])
    kept = sorted(Path(cfg.paths.checkpoints, "lora", "seed0").glob("checkpoint-*"))
    assert kept and all(int(p.name.split("-")[1]) < bad_step for p in kept)
    state = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert all(math.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)
    assert not (tmp_path / "out").exists()


def _train_cli(params: Path, *, kill_after: Path | None = None) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlora_pipeline",
            "--params",
            str(params),
            "train",
            "qlora",
            "--seed",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_after is not None:
        deadline = time.monotonic() + 300
        while not kill_after.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode()[-3000:])
    return proc.returncode


def test_sigkilled_run_resumes_to_the_same_adapter_bitwise(
    tiny_cfg, tiny_base, tiny_data, tmp_path
):
    params = OmegaConf.to_container(OmegaConf.structured(tiny_cfg))
    params["train"].update(max_steps=40, save_steps=10, keep_checkpoints=2, eval_steps=10)
    files = {}
    for run in ("straight", "killed"):
        params["paths"]["adapters"] = str(tmp_path / run / "adapters")
        params["paths"]["checkpoints"] = str(tmp_path / run / "checkpoints")
        files[run] = tmp_path / f"{run}.yaml"
        files[run].write_text(yaml.safe_dump(params))
    assert _train_cli(files["straight"]) == 0
    ckpts = tmp_path / "killed/checkpoints/qlora/seed1"
    assert _train_cli(files["killed"], kill_after=ckpts / "checkpoint-20") == -signal.SIGKILL
    assert not (tmp_path / "killed/adapters/qlora/seed1").exists()  # nothing half-written
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) in (
        ["checkpoint-10", "checkpoint-20"],
        ["checkpoint-20", "checkpoint-30"],
    )
    assert _train_cli(files["killed"]) == 0  # the same command again: resumes
    metrics = json.loads((tmp_path / "killed/adapters/qlora/seed1/train_metrics.json").read_text())
    record = json.loads(Path(tiny_cfg.paths.runs, "train@qlora-1.json").read_text())
    assert record["resumed_from_step"] in (20, 30) and metrics["steps"] == 40
    a = load_file(tmp_path / "straight/adapters/qlora/seed1/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapters/qlora/seed1/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "killed/adapters/qlora/seed1/steps.jsonl").read_text().splitlines()
    ]
    assert (
        steps == sorted(steps) and len(steps) == len(set(steps)) + 4
    )  # the 4 eval rows share steps with loss rows


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_export_merges_within_tolerance_and_loads_without_peft(
    trained, tiny_cfg, tiny_base, tiny_data, tiny_tokenizer, tmp_path, method
):
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.modeling import export as export_mod

    adapter = adapter_dir(tiny_cfg, method)
    result = export_mod.export(tiny_cfg, method, tiny_base, adapter, tiny_data, tmp_path / "out")
    tol = result["tolerance"]
    assert result["merged_vs_unmerged"]["max_abs_over_max_logit"] <= tol["max_abs_over_max_logit"]
    assert result["merged_vs_unmerged"]["top1_agreement"] >= tol["top1_agreement"]
    assert ("bf16_base_plus_adapter_vs_as_trained" in result) == (method == "qlora")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert (
        "model.safetensors" in files
        and "tokenizer.json" in files
        and not [f for f in files if f.endswith(".bin")]
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    texts = export_mod.prompts(tiny_data)
    again = export_mod.logits(merged, tiny_tokenizer, texts)
    reference = export_mod.logits(
        load_adapted(tiny_base, tiny_cfg.methods[method], adapter), tiny_tokenizer, texts
    )
    assert export_mod.compare(again, reference) == pytest.approx(
        result["merged_vs_as_trained"], rel=1e-6
    )


@pytest.mark.parametrize("which", ["base", "qlora_on_bf16", "merged"])
def test_every_model_evaluation_loads_sits_where_training_ran(
    trained, tiny_cfg, tiny_base, tiny_data, tmp_path, which
):
    """On a GPU machine a model left on the CPU would be evaluated there (lm-eval feeds inputs to
    the model's device): the merged export was, before `placement()` was used for it."""
    from qlora_pipeline.evaluation.evaluate import load_for_eval
    from qlora_pipeline.modeling import export as export_mod
    from qlora_pipeline.modeling.device import device

    exports = tmp_path / "exports"
    if which == "merged":
        adapter = adapter_dir(tiny_cfg, "qlora")
        export_mod.export(tiny_cfg, "qlora", tiny_base, adapter, tiny_data, exports / "qlora")
    adapters = Path(tiny_cfg.paths.adapters)
    model = load_for_eval(tiny_cfg, which, tiny_base, adapters, exports)
    assert {p.device.type for p in model.parameters()} == {device()}


@pytest.mark.gpu
def test_logits_of_models_on_two_devices_are_compared_on_one(tiny_base, tiny_data, tiny_tokenizer):
    """The export compares the 4-bit model, the unmerged and the saved merged model: on a GPU
    machine they sit on different devices, and their logits are compared on the CPU."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.modeling import export as export_mod

    texts = export_mod.prompts(tiny_data)
    on_cpu = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    on_gpu = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).to("cuda")
    a = export_mod.logits(on_gpu.eval(), tiny_tokenizer, texts)
    b = export_mod.logits(on_cpu, tiny_tokenizer, texts)
    assert a[0].device.type == b[0].device.type == "cpu"
    assert export_mod.compare(a, b)["top1_agreement"] >= 0.95


def test_export_out_of_tolerance_writes_nothing(
    trained, tiny_cfg, tiny_base, tiny_data, tmp_path, monkeypatch
):
    from qlora_pipeline.modeling import export as export_mod

    monkeypatch.setattr(
        export_mod, "TOLERANCE", {"max_abs_over_max_logit": 0.0, "top1_agreement": 1.0}
    )
    with pytest.raises(
        PipelineError,
        match=r"export\[qlora\]: merged logits differ from base \+ adapter beyond tolerance",
    ):
        export_mod.export(
            tiny_cfg,
            "qlora",
            tiny_base,
            adapter_dir(tiny_cfg, "qlora"),
            tiny_data,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_fsdp_qlora_accelerate_config_and_method_preset_validate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from conftest import ROOT

    from qlora_pipeline.tracking.dvc import compose

    accel = load_config_from_file(str(ROOT / "conf/accelerate/fsdp_qlora.yaml"))
    assert accel.distributed_type == DistributedType.FSDP
    assert accel.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert accel.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    _, cfg = compose(ROOT, ["method@methods.qlora=qlora-fsdp"])
    q = cfg.methods["qlora"]
    assert q.name == "qlora" and q.quantization.quant_storage == q.base_dtype == "bfloat16"
    assert q.quantization.quant_type == "nf4" and q.quantization.double_quant


def test_fsdp_load_uses_the_storage_dtype_and_skips_the_fp32_upcast(
    tiny_cfg, tiny_base, monkeypatch
):
    import bitsandbytes as bnb

    method = copy.deepcopy(tiny_cfg.methods["qlora"])
    method.quantization.quant_storage = "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = attach_lora(load_base(tiny_base, method), conf_default("train.lora"), method, 0, True)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # one dtype, so FSDP can flatten and shard it
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
