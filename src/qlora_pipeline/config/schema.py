"""Typed schema of the composed config (`conf/` -> `params.yaml`).

`conf/` stays pure YAML so that DVC can compose it without the Hydra runtime; this schema validates
the result: unknown keys, wrong types and bad values stop with one line naming the key.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_pipeline.errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")


@dataclass
class BootstrapConfig:
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    max_position_embeddings: int = MISSING
    corpus_lines: int = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    seq_len: int = MISSING
    lr: float = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING
    path: str | None = MISSING
    revision: str | None = MISSING
    trust_remote_code: bool = MISSING
    bootstrap: BootstrapConfig | None = MISSING


@dataclass
class SyntheticConfig:
    skills: list[str] = MISSING
    string_length: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING


@dataclass
class ContaminationConfig:
    ngram: int = MISSING
    threshold: float = MISSING
    drop: bool = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING
    path: str | None = MISSING
    hub_config: str | None = MISSING
    revision: str | None = MISSING
    splits: dict[str, str] | None = MISSING
    format: str = MISSING
    columns: dict[str, str] | None = MISSING
    message_keys: dict[str, str] = MISSING
    roles: dict[str, str] | None = MISSING
    template: str = MISSING
    loss_on: str = MISSING
    max_length: int = MISSING
    length_policy: str = MISSING
    dedupe: bool = MISSING
    shuffle: bool = MISSING
    max_samples: int | None = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    packing: bool = MISSING
    synthetic: SyntheticConfig | None = MISSING
    frozen_test: str | None = MISSING


@dataclass
class QuantizationConfig:
    quant_type: str = MISSING
    double_quant: bool = MISSING
    compute_dtype: str = MISSING
    quant_storage: str = MISSING
    skip_modules: list[str] = MISSING


@dataclass
class MethodConfig:
    name: str = MISSING
    base_dtype: str = MISSING
    optimizer: str = MISSING
    quantization: QuantizationConfig | None = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING
    use_rslora: bool = MISSING
    use_dora: bool = MISSING
    init: str = MISSING


@dataclass
class TrainConfig:
    max_steps: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    lr_scheduler: str = MISSING
    warmup_ratio: float = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    gradient_checkpointing: bool = MISSING
    upcast_non_quantized: bool = MISSING
    logging_steps: int = MISSING
    eval_steps: int | None = MISSING
    save_steps: int | None = MISSING
    keep_checkpoints: int = MISSING
    report_to: list[str] = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvalConfig:
    tasks: list[str] = MISSING
    tasks_dir: str | None = MISSING
    batch_size: int = MISSING
    limit: int | None = MISSING
    num_fewshot: int | None = MISSING
    max_gen_toks: int = MISSING
    gen_kwargs: dict[str, Any] | None = MISSING


@dataclass
class GateConfig:
    enforce: bool = MISSING
    tasks: list[str] | None = MISSING
    min_gain_over_base: float = MISSING
    max_drop_vs_lora: float = MISSING
    min_retention: float | None = MISSING
    max_drop_vs_accepted: float = MISSING
    max_cumulative_drop: float | None = MISSING


@dataclass
class ReportConfig:
    title: str = MISSING
    accepted_rev: str | None = MISSING
    anchor_rev: str | None = MISSING
    allow_protocol_change: bool = MISSING
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class PromotionConfig:
    branch: str | None = MISSING
    author_name: str = MISSING
    author_email: str = MISSING
    dvc_remote: str | None = MISSING
    git_remote: str | None = MISSING


@dataclass
class OrchestrationConfig:
    """How the flow schedules stages (conf/orchestration/): no stage's params, no hash moves."""

    slots: int = MISSING
    limit: str = MISSING
    retries: int = MISSING
    retry_delays_s: list[float] = MISSING
    gpu_memory_gb: float | None = MISSING


@dataclass
class RuntimeConfig:
    cpu_kernels: str = MISSING
    threads: int = MISSING


@dataclass
class PathsConfig:
    base: str = MISSING
    data: str = MISSING
    adapters: str = MISSING
    checkpoints: str = MISSING
    exports: str = MISSING
    eval: str = MISSING
    quant: str = MISSING
    report: str = MISSING
    runs: str = MISSING
    sweeps: str = MISSING
    output_roots: list[str] = MISSING  # not an output: where they may go


@dataclass
class PipelineConfig:
    """The composed config. Every default lives in `conf/` (MISSING here): a key that `conf/`
    does not set is an error naming it, never a second, silently different default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    seed: int = MISSING
    seeds: list[int] = MISSING
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def _cuda() -> bool:
    """Whether a GPU is here; asked only when a GPU-only option is set (importing torch costs)."""
    import torch

    return bool(torch.cuda.is_available())


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


def _positive(value: float, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value}")


# What the pipeline reads and must never replace: every output folder is replaced whole.
INPUT_FOLDERS = ("data/raw", "data/frozen", "conf", "src", "pipelines", "tests", ".dvc", ".git")


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _inside(path: str, roots: list[str]) -> bool:
    return any(path.startswith(posixpath.normpath(r).rstrip("/") + "/") for r in roots)


def _check_output_paths(cfg: PipelineConfig) -> None:
    """Every `paths.*` output stays inside the project (relative, no `..`) or inside one of
    `paths.output_roots` (absolute folders, e.g. a scratch disk), and none equals, contains or
    sits inside an input (the folders above, `data.path`, a local `model.path`) or another
    output."""
    roots = cfg.paths.output_roots
    for i, root in enumerate(roots):
        _check(
            PurePosixPath(root).is_absolute() and posixpath.normpath(root) != "/",
            f"paths.output_roots[{i}]",
            f"must be an absolute folder other than '/', got {root!r}",
        )
    inputs = list(INPUT_FOLDERS)
    for where in (cfg.data.path, cfg.model.path):
        if where:
            inputs.append(posixpath.normpath(where))
    seen: dict[str, str] = {}
    for key, value in vars(cfg.paths).items():
        if key == "output_roots":
            continue
        path = PurePosixPath(value)
        norm = posixpath.normpath(value)
        inside = (
            _inside(norm, roots) if path.is_absolute() else ".." not in path.parts and norm != "."
        )
        _check(
            inside,
            f"paths.{key}",
            f"must be a folder inside the project (relative, no '..') or inside one of "
            f"paths.output_roots {roots}, got {value!r}",
        )
        for other in inputs:
            _check(
                not _overlaps(norm, other),
                f"paths.{key}",
                f"{value!r} overlaps the input {other!r}; an output folder is replaced whole, "
                "so it must not equal, contain or sit inside what the pipeline reads",
            )
        for other_key, other in seen.items():
            _check(
                not _overlaps(norm, other),
                f"paths.{key}",
                f"{value!r} overlaps paths.{other_key} ({other!r}); outputs need folders of their own",
            )
        seen[key] = norm


def _validate_values(cfg: PipelineConfig) -> None:
    _check_output_paths(cfg)
    m = cfg.model
    _one_of(m.source, ("bootstrap", "pretrained"), "model.source")
    if m.source == "bootstrap":
        _check(m.bootstrap is not None, "model.bootstrap", "required when model.source=bootstrap")
        assert m.bootstrap is not None
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            value = getattr(m.bootstrap, name)
            _check(
                value > 0 and value % 128 == 0,
                f"model.bootstrap.{name}",
                f"must be a positive multiple of 128 (bitsandbytes' 4-bit blocks), got {value}",
            )
        b = m.bootstrap
        _check(
            b.hidden_size % b.num_heads == 0, "model.bootstrap.num_heads", "must divide hidden_size"
        )
        _check(
            b.num_heads % b.num_kv_heads == 0,
            "model.bootstrap.num_kv_heads",
            "must divide num_heads",
        )
        for name in ("num_layers", "steps", "batch_size", "seq_len", "lr", "corpus_lines"):
            _positive(getattr(b, name), f"model.bootstrap.{name}")
    else:
        _check(
            bool(m.path), "model.path", "required when model.source=pretrained (hub id or folder)"
        )
        from qlora_pipeline.modeling.checks import is_local

        assert m.path is not None
        _check(
            not is_local(m.path) or Path(m.path).expanduser().is_dir(),
            "model.path",
            f"no folder {m.path!r} (a hub id is spelled org/name)",
        )

    d = cfg.data
    from qlora_pipeline.data.formats import FIELDS, FORMATS
    from qlora_pipeline.data.templates import TEMPLATES

    _one_of(d.source, ("synthetic", "local", "hub"), "data.source")
    _one_of(d.format, FORMATS, "data.format")
    _one_of(d.template, TEMPLATES, "data.template")
    _one_of(d.loss_on, ("response", "all"), "data.loss_on")
    _one_of(d.length_policy, ("truncate", "drop"), "data.length_policy")
    for canonical in d.columns or {}:
        _one_of(canonical, tuple(FIELDS[d.format]), f"data.columns.{canonical}")
    _positive(d.max_length, "data.max_length")
    _check(d.max_samples is None or d.max_samples > 0, "data.max_samples", "must be > 0 or null")
    for name in ("val_fraction", "test_fraction"):
        _check(0 < getattr(d, name) < 0.5, f"data.{name}", "must be in (0, 0.5)")
    _positive(d.contamination.ngram, "data.contamination.ngram")
    _check(0 < d.contamination.threshold <= 1, "data.contamination.threshold", "must be in (0, 1]")
    if d.splits is not None:
        for split in d.splits:
            _one_of(split, ("train", "val", "test"), f"data.splits.{split}")
        _check("train" in d.splits, "data.splits", "must name the train split (or be null)")
    if d.source == "synthetic":
        _check(d.synthetic is not None, "data.synthetic", "required when data.source=synthetic")
        assert d.synthetic is not None
        from qlora_pipeline.data.skills import SKILLS

        for skill in d.synthetic.skills:
            _one_of(skill, tuple(SKILLS), "data.synthetic.skills")
        _check(bool(d.synthetic.skills), "data.synthetic.skills", "must not be empty")
        for name in ("string_length", "n_train", "n_val", "n_test"):
            _positive(getattr(d.synthetic, name), f"data.synthetic.{name}")
    else:
        _check(
            bool(d.path),
            "data.path",
            f"required when data.source={d.source} (a file or folder; for hub, a dataset name)",
        )

    _check({"qlora", "lora"} <= set(cfg.methods), "methods", "must define both 'qlora' and 'lora'")
    for name, method in cfg.methods.items():
        _one_of(method.base_dtype, DTYPES, f"methods.{name}.base_dtype")
        _one_of(method.optimizer, OPTIMIZERS, f"methods.{name}.optimizer")
        if method.quantization is not None:
            q = method.quantization
            _one_of(q.quant_type, ("nf4", "fp4"), f"methods.{name}.quantization.quant_type")
            _one_of(q.compute_dtype, DTYPES, f"methods.{name}.quantization.compute_dtype")
            _one_of(
                q.quant_storage,
                ("uint8", *DTYPES),
                f"methods.{name}.quantization.quant_storage",
            )
    _check(cfg.methods["qlora"].quantization is not None, "methods.qlora.quantization", "required")

    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "lr", "logging_steps", "max_grad_norm"):
        _positive(getattr(t, name), f"train.{name}")
    _check(
        t.logging_steps <= t.max_steps,
        "train.logging_steps",
        f"must be at most train.max_steps ({t.max_steps}): the loss is recorded at logging steps, "
        "and a run with none has no training curve",
    )
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    _positive(t.lora.r, "train.lora.r")
    _positive(t.lora.alpha, "train.lora.alpha")
    _check(0 <= t.lora.dropout < 1, "train.lora.dropout", "must be in [0, 1)")
    _one_of(t.lora.init, ("default", "gaussian", "loftq"), "train.lora.init")
    if t.lora.init == "loftq":
        plain = sorted(name for name, m in cfg.methods.items() if m.quantization is None)
        _check(
            not plain,
            "train.lora.init",
            f"loftq starts the adapters from the quantization error of a 4-bit base, but "
            f"{', '.join(f'methods.{n}' for n in plain)} is not quantized (train.lora is shared by "
            "both arms, so they would start differently); use default or gaussian",
        )
        _check(_cuda(), "train.lora.init", "loftq runs on CUDA only (peft's LoftQ), no GPU here")
    _positive(t.keep_checkpoints, "train.keep_checkpoints")
    for name in ("eval_steps", "save_steps"):
        value = getattr(t, name)
        _check(value is None or value > 0, f"train.{name}", "must be > 0 or null")
    _check(
        t.save_steps is None or t.save_steps % t.logging_steps == 0,
        "train.save_steps",
        "must be a multiple of train.logging_steps (a NaN loss is caught at logging steps, "
        "before a checkpoint can save it)",
    )
    for name in t.report_to:
        _one_of(name, ("tensorboard", "mlflow", "wandb"), "train.report_to")
    tm = t.lora.target_modules
    _check(
        tm == "all-linear"
        or (isinstance(tm, list) and len(tm) > 0 and all(isinstance(x, str) for x in tm)),
        "train.lora.target_modules",
        f"expected 'all-linear' or a list of module names, got {tm!r}",
    )
    _check(bool(cfg.seeds), "seeds", "must name at least one training seed")
    _check(
        len(set(cfg.seeds)) == len(cfg.seeds) and all(s >= 0 for s in cfg.seeds),
        "seeds",
        f"must be distinct non-negative integers, got {list(cfg.seeds)}",
    )
    _check(bool(cfg.eval.tasks), "eval.tasks", "must name at least one task")
    from qlora_pipeline.evaluation.catalog import known_task, tasks_dir

    task_dir = tasks_dir(cfg.eval.tasks_dir)
    _check(
        cfg.eval.tasks_dir is None or task_dir.is_dir(),
        "eval.tasks_dir",
        f"{cfg.eval.tasks_dir!r} is not a folder",
    )
    for name in cfg.eval.tasks:
        _check(
            known_task(name, task_dir),
            "eval.tasks",
            f"unknown task {name!r}: neither {task_dir}/{name}.yaml nor a task, group or tag "
            "of lm-eval (`lm-eval ls tasks`)",
        )
    _positive(cfg.eval.batch_size, "eval.batch_size")
    _positive(cfg.eval.max_gen_toks, "eval.max_gen_toks")
    _check(cfg.eval.limit is None or cfg.eval.limit > 0, "eval.limit", "must be > 0 or null")
    _check(
        cfg.eval.num_fewshot is None or cfg.eval.num_fewshot >= 0,
        "eval.num_fewshot",
        "must be >= 0 or null",
    )
    g = cfg.report.gate
    for name in ("max_drop_vs_lora", "max_drop_vs_accepted", "max_cumulative_drop"):
        value = getattr(g, name)
        _check(value is None or value >= 0, f"report.gate.{name}", "must be >= 0")
    for name in g.tasks or []:
        _one_of(name, tuple(cfg.eval.tasks), "report.gate.tasks")
    from qlora_pipeline.runtime import CPU_KERNELS

    _one_of(cfg.runtime.cpu_kernels, CPU_KERNELS, "runtime.cpu_kernels")
    _check(
        cfg.runtime.threads > 0 or cfg.runtime.cpu_kernels == "native",
        "runtime.threads",
        f"must be > 0 with pinned CPU kernels (the thread count is part of the result), got {cfg.runtime.threads}",
    )
    _check(cfg.runtime.threads >= 0, "runtime.threads", "must be >= 0")
    o = cfg.orchestration
    _check(o.slots >= 1, "orchestration.slots", f"must be >= 1, got {o.slots}")
    _check(o.retries >= 0, "orchestration.retries", f"must be >= 0, got {o.retries}")
    _check(
        bool(o.retry_delays_s) and min(o.retry_delays_s) >= 0,
        "orchestration.retry_delays_s",
        f"must be a non-empty list of seconds >= 0, got {o.retry_delays_s}",
    )
    _check(
        o.gpu_memory_gb is None or o.gpu_memory_gb > 0,
        "orchestration.gpu_memory_gb",
        f"must be GiB > 0 or null, got {o.gpu_memory_gb}",
    )


def validate_dict(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a composed config dict against the schema.

    Args:
        raw: the composed config (the content of `params.yaml`).

    Returns:
        The typed config.

    Raises:
        ConfigError: one line naming the offending key.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': {reason}") from None
    assert isinstance(cfg, PipelineConfig)
    _validate_values(cfg)
    return cfg


def load_params(path: str | Path = "params.yaml") -> PipelineConfig:
    """Load and validate a composed params file.

    Args:
        path: the YAML file written by `qlora-pipeline compose` or `dvc exp run`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `qlora-pipeline compose` first")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_dict(raw)
