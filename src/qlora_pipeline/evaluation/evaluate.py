"""The evaluate step: EleutherAI's lm-eval harness on base, QLoRA or LoRA, per-sample outputs kept.

The model is loaded here (4-bit base + adapter for QLoRA, bf16 base + adapter for LoRA, bf16 base
alone for base) and handed to `HFLM` as an object; tasks are YAML files in the repo.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.evaluation.catalog import tasks_dir
from qlora_pipeline.files import (
    atomic_dir,
    read_json,
    seed_dir,
    sha256_file,
    sha256_text,
    write_json,
)
from qlora_pipeline.modeling.device import device, placement
from qlora_pipeline.modeling.load import (
    attach_saved,
    compute_dtype,
    load_adapted,
    load_base,
    load_tokenizer,
    require_adapter,
    torch_dtype,
)
from qlora_pipeline.runtime import log

# What ships, scored with the same harness settings: the base; QLoRA as trained (4-bit base +
# adapter); the QLoRA adapter on the original bf16 base (what many deploy); the merged bf16 export;
# and LoRA. The arms (qlora, lora) are scored once per training seed; the shipped forms use the
# first seed's adapter.
MODELS = ("base", "qlora", "qlora_on_bf16", "merged", "lora")
ARMS = ("qlora", "lora")
SHIPPED = {
    "qlora": "QLoRA as trained (4-bit base + adapter)",
    "qlora_on_bf16": "QLoRA adapter on the bf16 base",
    "merged": "QLoRA merged into bf16 (export)",
    "lora": "LoRA (bf16 base + adapter)",
}


def task_config(task_dir: Path, name: str, test_jsonl: Path, max_gen_toks: int) -> dict[str, Any]:
    """Our YAML task with its data file pointed at the prepared test split."""
    cfg = yaml.safe_load((task_dir / f"{name}.yaml").read_text(encoding="utf-8"))
    if cfg.get("dataset_path") == "json":
        cfg["dataset_kwargs"] = {"data_files": {"test": str(test_jsonl.resolve())}}
    if cfg.get("output_type") == "generate_until":
        cfg.setdefault("generation_kwargs", {})["max_gen_toks"] = max_gen_toks
    return cfg


def missing_datasets(specs: list[tuple[str, str | None]]) -> list[str]:
    """The (dataset path, config) pairs that can be neither downloaded nor found in the cache."""
    import datasets

    missing = []
    for path, name in specs:
        try:
            datasets.load_dataset_builder(path, name)
        except (ConnectionError, FileNotFoundError, OSError, ValueError):
            missing.append(path + (f" ({name})" if name else ""))
    return missing


def resolve_tasks(
    names: list[str], task_dir: Path, test_jsonl: Path, max_gen_toks: int, manager: Any
) -> list[Any]:
    """lm-eval task specs: our YAML tasks (from `task_dir`) as inline configs reading the prepared
    test split, and standard harness tasks by name once their datasets are reachable.

    Raises:
        PipelineError: an unknown task name, or standard tasks whose datasets are unreachable.
    """
    specs: list[Any] = []
    hub: list[tuple[str, str | None]] = []
    for name in names:
        if (task_dir / f"{name}.yaml").is_file():
            specs.append(task_config(task_dir, name, test_jsonl, max_gen_toks))
            continue
        entry = manager.task_index.get(name)
        if entry is None:
            ours = sorted(p.stem for p in task_dir.glob("*.yaml"))
            raise PipelineError(
                f"config key 'eval.tasks': unknown task '{name}'; not in {task_dir} ({ours}) and "
                "not a registered lm-eval task (see `lm-eval ls tasks`)"
            )
        if entry.cfg and entry.cfg.get("dataset_path"):
            hub.append((entry.cfg["dataset_path"], entry.cfg.get("dataset_name")))
        specs.append(name)
    missing = missing_datasets(hub)
    if missing:
        raise PipelineError(
            f"eval tasks need datasets that are not reachable and not in the local cache: "
            f"{', '.join(missing)}; connect once to cache them, or drop those tasks from eval.tasks"
        )
    return specs


def load_for_eval(
    cfg: PipelineConfig, which: str, base_dir: Path, adapters_dir: Path, exports_dir: Path
) -> Any:
    """One model that is not an arm: base, the base in the LoRA arm's precision; qlora_on_bf16,
    the shipped QLoRA adapter on the base loaded as the LoRA arm loads it (not quantized); merged,
    the QLoRA export, a plain bf16 model with the adapter merged in."""
    trust = cfg.model.trust_remote_code
    if which == "base":
        model = load_base(base_dir, cfg.methods["lora"], trust)
        model.eval()
        return model
    if which == "merged":
        from transformers import AutoModelForCausalLM

        path = exports_dir / "qlora"
        if not (path / "model.safetensors").is_file():
            raise PipelineError(f"{path}: no merged model here; run the export stage first")
        return AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype(compute_dtype(cfg.methods["lora"].base_dtype)),
            use_safetensors=True,
            **placement(),
        ).eval()
    shipped = seed_dir(adapters_dir / "qlora", cfg.seeds[0])
    return load_adapted(base_dir, cfg.methods["lora"], shipped, trust)


def arm_models(
    cfg: PipelineConfig, arm: str, base_dir: Path, adapters_dir: Path
) -> Iterator[tuple[int, Any]]:
    """(seed, model) for every training seed of an arm: its base is loaded once, and each seed's
    adapter is put on it in turn (and taken off again), as a large base would need."""
    adapters = [require_adapter(seed_dir(adapters_dir / arm, s)) for s in cfg.seeds]
    base = load_base(base_dir, cfg.methods[arm], cfg.model.trust_remote_code)
    for seed, adapter in zip(cfg.seeds, adapters, strict=True):
        model = attach_saved(base, adapter)
        yield seed, model
        base = model.unload()


# lm-eval's results.json also holds the date, timings, the git hash, the host's hardware
# (pretty_env_info) and absolute paths; only these keys are the same bytes on every machine.
STABLE_RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "lm_eval_version",
    "transformers_version",
    "max_length",
)


def stable_results(results: dict[str, Any], test_jsonl: Path) -> dict[str, Any]:
    """lm-eval's results without what differs per machine, date or folder: the prepared test file
    is named by its path as configured, not the absolute path the harness was given."""
    out = {k: results[k] for k in STABLE_RESULT_KEYS if k in results}
    for task_cfg in out.get("configs", {}).values():
        files = (task_cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict) and "test" in files:
            files["test"] = test_jsonl.as_posix()
    return out


def protocol(cfg: PipelineConfig, results: dict[str, Any], template: str) -> dict[str, Any]:
    """The evaluation protocol: what must match for two runs' scores to be comparable.

    The test set is kept apart (`test_set`): another test set is not another protocol, but it
    makes a paired comparison impossible.
    """
    from importlib.metadata import version

    tasks = {}
    for name, task_cfg in sorted(results.get("configs", {}).items()):
        shown = json.loads(json.dumps(task_cfg, sort_keys=True, default=str))
        shown.pop("dataset_kwargs", None)  # the test file's path: the test set's identity is apart
        tasks[name] = {
            "version": results.get("versions", {}).get(name),
            "config_sha256": sha256_text(json.dumps(shown, sort_keys=True)),
            "num_fewshot": results.get("n-shot", {}).get(name),
            "output_type": task_cfg.get("output_type"),
            "generation_kwargs": task_cfg.get("generation_kwargs"),
        }
    return {
        "lm_eval": version("lm_eval"),
        "tasks": tasks,
        "template": template,
        "batch_size": cfg.eval.batch_size,
        "limit": cfg.eval.limit,
        "gen_kwargs": cfg.eval.gen_kwargs,
        "max_gen_toks": cfg.eval.max_gen_toks,
        "long_items": "lm-eval default: the context is left-truncated to the model's length",
    }


def primary_metric(
    task_results: dict[str, Any], first: str | None = None
) -> tuple[str, float, float | None]:
    """The task's primary `metric,filter`, its value and its stderr: the first metric of the
    task's `metric_list` (`first`) when given, else the first metric in the results."""
    for key, value in task_results.items():
        if (
            "," in key
            and "_stderr" not in key
            and isinstance(value, (int, float))
            and (first is None or key.split(",", 1)[0] == first)
        ):
            metric, filt = key.split(",", 1)
            stderr = task_results.get(f"{metric}_stderr,{filt}")
            return (
                key,
                float(value),
                None if not isinstance(stderr, (int, float)) else float(stderr),
            )
    raise PipelineError(f"lm-eval returned no metric: {sorted(task_results)}")


def evaluate(
    cfg: PipelineConfig,
    which: str,
    base_dir: str | Path,
    data_dir: str | Path,
    adapters_dir: str | Path,
    out_dir: str | Path,
    exports_dir: str | Path = "models/export",
) -> list[dict]:
    """Run the configured lm-eval tasks on one model (an arm: on each training seed's adapter) and
    save results and per-sample outputs.

    Args:
        cfg: the validated pipeline config.
        which: one of MODELS.
        base_dir, data_dir, adapters_dir: outputs of the earlier stages.
        out_dir: gets `metrics.json`, `results.json` (harness output) and `samples_<task>.jsonl`;
            for an arm, in one `seed<N>` folder per training seed. Written atomically, as a whole.

    Returns:
        The content of each `metrics.json`, in seed order.
    """
    from lm_eval.tasks import TaskManager

    if which not in MODELS:
        raise PipelineError(
            f"evaluate: unknown model '{which}'; expected one of {', '.join(MODELS)}"
        )
    test_jsonl = Path(data_dir) / "test.jsonl"
    if not test_jsonl.is_file():
        raise PipelineError(f"{test_jsonl}: not found; run the prepare stage first")
    tdir = tasks_dir(cfg.eval.tasks_dir)
    # Indexing lm-eval's own ~14k task files takes ~6 s per process: only when a task needs it.
    standard = any(not (tdir / f"{name}.yaml").is_file() for name in cfg.eval.tasks)
    manager = TaskManager(include_path=str(tdir), include_defaults=standard)
    specs = resolve_tasks(cfg.eval.tasks, tdir, test_jsonl, cfg.eval.max_gen_toks, manager)
    with open(test_jsonl, encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    ours = [s["task"] for s in specs if isinstance(s, dict) and s.get("dataset_path") == "json"]
    if ours and "prompt" not in first:
        raise PipelineError(
            f"{test_jsonl}: no prompt/answer rows (data.format={cfg.data.format}), which "
            f"{', '.join(ours)} need; set eval.tasks to tasks that fit this data"
        )
    tokenizer = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    base_dir, adapters_dir = Path(base_dir), Path(adapters_dir)
    if which in ARMS:
        models: Any = arm_models(cfg, which, base_dir, adapters_dir)
    else:
        seed = None if which == "base" else cfg.seeds[0]
        models = [(seed, load_for_eval(cfg, which, base_dir, adapters_dir, Path(exports_dir)))]
    template = read_json(Path(data_dir) / "manifest.json")["template"]
    found = []
    with atomic_dir(out_dir) as tmp:
        for seed, model in models:
            folder = seed_dir(tmp, seed) if which in ARMS else tmp
            found.append(
                score(cfg, which, seed, model, tokenizer, specs, manager, test_jsonl, template)
            )
            write_scores(folder, *found[-1])
    return [metrics for metrics, _, _ in found]


def score(
    cfg: PipelineConfig,
    which: str,
    seed: int | None,
    model: Any,
    tokenizer: Any,
    specs: list[Any],
    manager: Any,
    test_jsonl: Path,
    template: str,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[dict]]]:
    """lm-eval on one loaded model: (metrics.json content, results, per-task sample rows)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    label = which if seed is None else f"{which} seed {seed}"
    footprint = int(model.get_memory_footprint())
    log.info(
        "evaluate[%s]: %s on %s (footprint %.2f MB)",
        label,
        ", ".join(cfg.eval.tasks),
        device(),
        footprint / 2**20,
    )
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=cfg.eval.batch_size,
        add_bos_token=False,
        max_length=getattr(model.config, "max_position_embeddings", None),
    )
    results = simple_evaluate(
        model=lm,
        tasks=specs,
        task_manager=manager,
        limit=cfg.eval.limit,
        num_fewshot=cfg.eval.num_fewshot,
        gen_kwargs=dict(cfg.eval.gen_kwargs) if cfg.eval.gen_kwargs else None,
        log_samples=True,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=1000,
    )
    if results is None:
        raise PipelineError("lm-eval returned no results")
    samples = results.pop("samples", {})
    metrics: dict[str, Any] = {
        "model": which,
        "seed": seed,
        "footprint_bytes": footprint,
        "protocol": protocol(cfg, results, template),
        "test_set": sha256_file(test_jsonl),
        "tasks": {},
    }
    for task, task_results in results["results"].items():
        metric_list = results.get("configs", {}).get(task, {}).get("metric_list") or [{}]
        key, value, stderr = primary_metric(task_results, metric_list[0].get("metric"))
        n = len({row["doc_id"] for row in samples.get(task, [])})  # items, not rows per filter
        metrics["tasks"][task] = {"metric": key, "value": value, "stderr": stderr, "n": n}
        log.info("evaluate[%s]: %s %s = %.3f (n=%d)", label, task, key, value, n)
    return metrics, stable_results(results, test_jsonl), samples


def write_scores(
    folder: Path,
    metrics: dict[str, Any],
    results: dict[str, Any],
    samples: dict[str, list[dict]],
) -> None:
    """One evaluation's files: metrics.json, results.json and samples_<task>.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    for task, rows in samples.items():
        with open(folder / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    write_json(folder / "metrics.json", metrics)
