"""Shared fixtures: the real conf/ composed with overrides that shrink it (the smallest config)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.files import seed_dir
from qlora_pipeline.runtime import pin_cpu

pin_cpu("avx2", 2)  # as every stage does, before torch is imported: the same bytes as the CLI

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import scratch_copy  # noqa: E402  (the benchmarks' scratch copies too)

# The smallest config: the same machinery as the default, shrunk to seconds.
TINY = [
    "model.bootstrap.vocab_size=384",
    "model.bootstrap.hidden_size=128",
    "model.bootstrap.intermediate_size=256",
    "model.bootstrap.num_layers=2",
    "model.bootstrap.num_heads=2",
    "model.bootstrap.num_kv_heads=2",
    "model.bootstrap.corpus_lines=12000",
    "model.bootstrap.steps=600",
    "model.bootstrap.lr=0.003",
    "data.synthetic.skills=[reverse,sort]",
    "data.synthetic.n_train=2000",
    "data.synthetic.n_val=20",
    "data.synthetic.n_test=40",
    "train.max_steps=300",
    "train.logging_steps=5",
    "eval.batch_size=40",
]


@functools.cache
def _composed() -> PipelineConfig:
    from qlora_pipeline.tracking.dvc import compose

    return compose(ROOT, [])[1]


def conf_default(section: str, **changes: Any) -> Any:
    """A section of the default config as `conf/` composes it (the only place defaults live),
    with `changes`: e.g. conf_default("train.lora", r=8)."""
    value: Any = _composed()
    for name in section.split("."):
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return dataclasses.replace(copy.deepcopy(value), **changes)


@functools.cache
def prefect_home() -> Path:
    """A PREFECT_HOME as a first run leaves it (the database migrated, block types registered):
    made once per session by starting and stopping a temporary server, ~7 s that every
    project's first `run` would otherwise spend on its own."""
    home = Path(os.environ["PREFECT_HOME"]) / "template"  # the session's (_isolated_prefect)
    home.mkdir(parents=True, exist_ok=True)
    start_stop = (
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "server = SubprocessASGIServer()\nserver.start(timeout=120)\nserver.stop()\n"
    )
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run([sys.executable, "-c", start_stop], env=env, check=True, capture_output=True)
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all of it in prefect.db
    return home


def copy_project(dst: Path) -> None:
    """What a fresh clone has (no outputs, no caches), as a git repository of its own, with a
    ready Prefect database in its (git-ignored) PREFECT_HOME."""
    scratch_copy(dst)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    template = prefect_home()
    (dst / ".prefect").mkdir()
    for name in ("prefect.db", "memo_store.toml"):  # the memo: block types are registered
        shutil.copy2(template / name, dst / ".prefect" / name)


def cli_env(project: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a command runs with in `project`: its PREFECT_HOME, unbuffered output,
    this interpreter's bin folder first on PATH; `env` on top."""
    out = {
        **os.environ,
        "PREFECT_HOME": str(project / ".prefect"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out["PATH"]
    return out


def run_cli(
    project: Path, *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=project,
        env=cli_env(project, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    # The in-process flows' temporary server: no network here, its telemetry would log an ERROR
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    yield
    # Stop the temporary server Prefect started for the in-process flows now, while pytest's
    # output is open: its exit handler would log into a closed stream ("--- Logging error ---").
    # First hand it the logs and events still queued: sent after it stopped, they end the
    # session with "--- Error logging to API --- All connection attempts failed".
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        server.SubprocessASGIServer().stop()


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """The composed, validated smallest config with all paths in a temporary folder."""
    from qlora_pipeline.tracking.dvc import compose

    work = tmp_path_factory.mktemp("tiny")
    _, cfg = compose(ROOT, TINY)
    for name in (
        "base",
        "data",
        "adapters",
        "checkpoints",
        "exports",
        "eval",
        "quant",
        "report",
        "runs",
    ):
        setattr(cfg.paths, name, str(work / name))
    cfg.paths.output_roots = [str(tmp_path_factory.getbasetemp())]  # outputs outside the project
    return cfg


@pytest.fixture(scope="session")
def tiny_base(tiny_cfg):
    from qlora_pipeline.modeling.bootstrap import bootstrap

    bootstrap(tiny_cfg.model, tiny_cfg.seed, tiny_cfg.paths.base)
    return Path(tiny_cfg.paths.base)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cfg, tiny_base):
    from qlora_pipeline.modeling.load import load_tokenizer

    return load_tokenizer(tiny_base)


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg, tiny_base, tiny_tokenizer):
    from qlora_pipeline.data.prepare import prepare

    prepare(tiny_cfg.data, tiny_tokenizer, tiny_cfg.seed, tiny_cfg.paths.data)
    return Path(tiny_cfg.paths.data)


def adapter_dir(cfg, method: str) -> Path:
    """Where the train stage puts a method's adapter of the first (shipped) training seed."""
    return seed_dir(Path(cfg.paths.adapters) / method, cfg.seeds[0])


@pytest.fixture(scope="session")
def trained(tiny_cfg, tiny_base, tiny_data):
    """Both methods trained in-process; returns {method: (metrics, in-memory model)}."""
    from qlora_pipeline.training import train as train_mod

    out = {}
    for method in ("qlora", "lora"):
        captured = {}
        original = train_mod.attach_lora

        def spy(*args, _captured=captured, _original=original, **kwargs):
            _captured["model"] = _original(*args, **kwargs)
            return _captured["model"]

        train_mod.attach_lora = spy
        try:
            metrics = train_mod.train(
                tiny_cfg,
                method,
                tiny_cfg.seeds[0],
                tiny_base,
                tiny_data,
                adapter_dir(tiny_cfg, method),
            )
        finally:
            train_mod.attach_lora = original
        out[method] = (metrics, captured["model"])
    return out
