"""Task resolution for lm-eval: our YAML tasks, standard harness tasks by name, clear errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from conftest import adapter_dir

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.evaluation.catalog import DEFAULT_TASKS_DIR
from qlora_pipeline.evaluation.evaluate import resolve_tasks


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(DEFAULT_TASKS_DIR))


def test_our_tasks_read_the_prepared_split_with_both_output_types(manager, tmp_path):
    test_jsonl = tmp_path / "test.jsonl"
    gen, ll = resolve_tasks(
        ["qlora_synthetic_qa", "qlora_answer_ll"], DEFAULT_TASKS_DIR, test_jsonl, 7, manager
    )
    for spec in (gen, ll):
        assert spec["dataset_kwargs"] == {"data_files": {"test": str(test_jsonl.resolve())}}
    assert gen["output_type"] == "generate_until" and gen["generation_kwargs"]["max_gen_toks"] == 7
    assert ll["output_type"] == "loglikelihood" and "generation_kwargs" not in ll
    assert ll["doc_to_target"] == "{{target}}"


def test_unknown_task_names_the_key_and_what_exists(manager, tmp_path):
    with pytest.raises(
        PipelineError,
        match=r"config key 'eval.tasks': unknown task 'qlora_nope'; not in .*'qlora_answer_ll', 'qlora_gsm8k', 'qlora_synthetic_qa'",
    ):
        resolve_tasks(["qlora_nope"], DEFAULT_TASKS_DIR, tmp_path / "t.jsonl", 8, manager)


def test_standard_task_offline_names_the_missing_datasets(manager, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as err:
        resolve_tasks(
            ["arc_easy", "hellaswag"], DEFAULT_TASKS_DIR, tmp_path / "t.jsonl", 8, manager
        )
    message = str(err.value)
    assert "allenai/ai2_arc (ARC-Easy)" in message and "hellaswag" in message
    assert "not reachable and not in the local cache" in message and "\n" not in message


def test_text_data_with_prompt_tasks_is_a_clear_error(tiny_cfg, tmp_path):
    from qlora_pipeline.evaluation.evaluate import evaluate

    (tmp_path / "test.jsonl").write_text('{"text": "some raw text"}\n')
    with pytest.raises(
        PipelineError,
        match=r"test\.jsonl: no prompt/answer rows \(data\.format=alpaca\), which qlora_synthetic_qa need",
    ):
        evaluate(tiny_cfg, "base", tmp_path, tmp_path, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_our_gsm8k_task_scores_as_lm_evals_own_gsm8k(manager, tmp_path):
    """Same answer extraction (filters), metric settings and greedy decoding as lm-eval's gsm8k;
    only the data source (the prepared local test split) and the prompt marker differ."""
    import lm_eval
    import yaml

    theirs = yaml.safe_load(
        (Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text(encoding="utf-8")
    )
    (ours,) = resolve_tasks(
        ["qlora_gsm8k"], DEFAULT_TASKS_DIR, tmp_path / "test.jsonl", 256, manager
    )
    assert ours["filter_list"] == theirs["filter_list"]
    assert ours["metric_list"] == theirs["metric_list"]
    for key in ("do_sample", "temperature"):
        assert ours["generation_kwargs"][key] == theirs["generation_kwargs"][key]
    assert ours["generation_kwargs"]["max_gen_toks"] == 256
    assert ours["dataset_path"] == "json" and ours["doc_to_target"] == theirs["doc_to_target"]


def _samples(folder: Path) -> list[tuple[int, list]]:
    rows = (folder / "samples_qlora_synthetic_qa.jsonl").read_text().splitlines()
    return [(r["doc_id"], r["filtered_resps"]) for r in map(json.loads, rows)]


def test_an_arm_scores_every_seed_on_one_base_as_if_loaded_alone(
    tiny_cfg, tiny_base, tiny_data, trained, tmp_path
):
    """The arm's seeds share one loaded base, their adapters put on and taken off in turn: the
    second seed's answers are those of a base that never held the first seed's adapter."""
    from qlora_pipeline.evaluation.evaluate import evaluate
    from qlora_pipeline.training.train import train

    cfg = copy.deepcopy(tiny_cfg)
    cfg.paths.adapters = str(tmp_path / "adapters")
    cfg.train.max_steps, cfg.train.eval_steps, cfg.train.save_steps = 30, None, None
    shutil.copytree(adapter_dir(tiny_cfg, "lora"), tmp_path / "adapters/lora/seed0")
    train(cfg, "lora", 1, tiny_base, tiny_data, tmp_path / "adapters/lora/seed1")
    cfg.seeds = [0, 1]
    both = evaluate(cfg, "lora", tiny_base, tiny_data, cfg.paths.adapters, tmp_path / "both")
    cfg.seeds = [1]
    (alone,) = evaluate(cfg, "lora", tiny_base, tiny_data, cfg.paths.adapters, tmp_path / "alone")
    assert [m["seed"] for m in both] == [0, 1] and alone["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["seed0", "seed1"]
    assert _samples(tmp_path / "both/seed1") == _samples(tmp_path / "alone/seed1")
    assert _samples(tmp_path / "both/seed0") != _samples(tmp_path / "both/seed1")
    assert both[1]["tasks"] == alone["tasks"]
