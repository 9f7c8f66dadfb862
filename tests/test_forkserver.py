"""The fork server (qlora_pipeline.forkserver): a stage command run there writes the same bytes as
in its own process, dies with its command, and steps aside when it cannot serve."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, copy_project, run_cli

from qlora_pipeline.forkserver import ENV, delegate, serving

SHORT = [*TINY, "model.bootstrap.steps=30"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _stage(project: Path, address: str | None, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    env.pop(ENV, None)
    if address:
        env[ENV] = address
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_pipeline", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def project(tmp_path):
    copy_project(tmp_path)
    assert run_cli(tmp_path, "-m", "qlora_pipeline", "compose", *SHORT).returncode == 0
    return tmp_path


@pytest.mark.slow
def test_a_served_stage_writes_the_bytes_of_its_own_process(project):
    alone = _stage(project, None, "bootstrap")
    assert alone.wait(timeout=300) == 0, alone.stdout.read()  # type: ignore[union-attr]
    expected = _digest(project / "models/base")
    assert json.loads((project / "runs/bootstrap.json").read_text())["forked"] is False
    for path in (project / "models/base", project / "runs/bootstrap.json"):
        subprocess.run(["rm", "-rf", str(path)], check=True)

    with serving("avx2", 2) as address:
        served = _stage(project, address, "bootstrap")
        assert served.wait(timeout=300) == 0, served.stdout.read()  # type: ignore[union-attr]
    assert json.loads((project / "runs/bootstrap.json").read_text())["forked"] is True
    assert _digest(project / "models/base") == expected


@pytest.mark.slow
def test_a_killed_stage_command_takes_its_child_with_it(project):
    assert run_cli(project, "-m", "qlora_pipeline", "compose", *TINY).returncode == 0  # 600 steps
    with serving("avx2", 2) as address:
        server = int(address.split("@")[1])
        command = _stage(project, address, "bootstrap")
        deadline = time.monotonic() + 120
        while not _children(server):  # the server forked the stage's child
            assert command.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        child = _children(server)[0]
        time.sleep(3)  # well into pre-training
        command.send_signal(signal.SIGKILL)
        command.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and child in _children(server):
            assert time.monotonic() < deadline, "the child outlived its command"
            time.sleep(0.1)
    assert not (project / "models/base").exists()  # nothing half-written under the final name


@pytest.mark.slow
def test_a_killed_dvc_request_takes_dvc_and_the_stage_command_with_it(project):
    """SIGKILL the process that asked the server for `dvc repro` (a flow's stage task) while
    the stage command computes in its fork of DVC's child: both children end, nothing is left."""
    from qlora_pipeline.tracking.dvc import stage_env

    assert run_cli(project, "-m", "qlora_pipeline", "compose", *TINY).returncode == 0  # 600 steps
    with serving("avx2", 2) as address:
        server = int(address.split("@")[1])
        ask = (
            "import os, sys; from qlora_pipeline.forkserver import dvc; "
            "sys.exit(dvc(sys.argv[1], ['repro', '--single-item', 'bootstrap'], os.getcwd(), "
            "dict(os.environ), True))"
        )
        env = stage_env({ENV: address, "PREFECT_HOME": str(project / ".prefect")})
        asking = subprocess.Popen([sys.executable, "-c", ask, address], cwd=project, env=env)
        deadline = time.monotonic() + 120
        while not any(_children(c) for c in _children(server)):
            assert asking.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        (dvc_child,) = _children(server)
        (command,) = _children(dvc_child)
        time.sleep(3)  # well into pre-training
        asking.send_signal(signal.SIGKILL)
        asking.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _cmdline(command) or _cmdline(dvc_child):
            assert time.monotonic() < deadline, "DVC's child or its command outlived the request"
            time.sleep(0.1)
    assert not (project / "models/base").exists()  # nothing half-written under the final name


def test_only_a_plain_qlora_pipeline_command_runs_in_a_fork_of_dvc(tmp_path, monkeypatch):
    from qlora_pipeline import forkserver
    from qlora_pipeline.tracking.dvc_cli import own_command

    assert own_command("qlora-pipeline train qlora --seed 0") == ["train", "qlora", "--seed", "0"]
    assert own_command("qlora-pipeline evaluate 'a b'") == ["evaluate", "a b"]
    for shell in (
        "qlora-pipeline report && echo done",
        "qlora-pipeline report > out.txt",
        "qlora-pipeline train $METHOD",
        "qlora-pipeline evaluate *",
        "python -m qlora_pipeline report",
        "qlora-pipeline",
        "qlora-pipeline 'unclosed",
    ):
        assert own_command(shell) is None, shell

    params = tmp_path / "params.yaml"
    params.write_text("runtime: {cpu_kernels: native, threads: 2}\n")
    served = {ENV: f"avx2/2@{os.getppid()}@{tmp_path / 'socket'}"}
    monkeypatch.setattr(forkserver, "_SERVING", None)
    assert forkserver.command_here(["report"], str(tmp_path), served) is None  # not in a server
    monkeypatch.setattr(forkserver, "_SERVING", "avx2/2")
    assert forkserver.command_here(["report"], str(tmp_path), {}) is None  # no server named
    other = {ENV: f"avx2/2@{os.getpid()}@{tmp_path / 'socket'}"}
    assert forkserver.command_here(["report"], str(tmp_path), other) is None  # another server
    assert forkserver.command_here(["report"], str(tmp_path), served) is None  # pinned otherwise
    params.write_text("runtime: {cpu_kernels: avx2, threads: 2}\n")
    assert forkserver.command_here(["no-such-stage"], str(tmp_path), served) is None  # its error
    assert forkserver.command_here(["compose"], str(tmp_path), served) is None  # not a stage


def test_the_command_and_dvc_run_themselves_when_no_server_can_serve_them(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("runtime: {cpu_kernels: avx2, threads: 2}\n")
    monkeypatch.delenv(ENV, raising=False)
    assert delegate(["report"], str(params)) is None  # no server
    monkeypatch.setenv(ENV, f"native/0@{os.getpid()}@{tmp_path / 'socket'}")
    assert delegate(["report"], str(params)) is None  # a server for other CPU kernels
    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setenv(ENV, f"avx2/2@{gone.pid}@{tmp_path / 'socket'}")
    assert delegate(["report"], str(params)) is None  # a server that is gone
    # ... and DVC then runs as a process of its own
    from qlora_pipeline.forkserver import dvc
    from qlora_pipeline.tracking.dvc import run_dvc

    env = dict(os.environ)
    assert dvc(env[ENV], ["--version"], str(tmp_path), env, quiet=True) is None
    assert run_dvc(tmp_path, ["--version"], env, quiet=True) == 0


@pytest.mark.slow
def test_dvc_runs_in_a_child_of_the_server_as_a_dvc_process_would(project, capfd):
    import threading

    from qlora_pipeline.forkserver import dvc
    from qlora_pipeline.tracking.dvc import changed_stages, stage_env

    env = stage_env()
    env.pop(ENV, None)
    alone = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    with serving("avx2", 2) as address:
        server = int(address.split("@")[1])
        env[ENV] = address  # the stage command DVC runs finds the server too
        capfd.readouterr()
        assert dvc(address, ["status"], str(project), env, quiet=False) == alone.returncode
        assert capfd.readouterr().out == alone.stdout  # what `dvc status` says, on this stdout

        codes: list[int | None] = []
        argv = ["repro", "--single-item", "bootstrap"]
        run = threading.Thread(
            target=lambda: codes.append(dvc(address, argv, str(project), env, True))
        )
        run.start()
        commands: set[str] = set()  # what DVC's child ran the stage command in
        while run.is_alive():
            for child in _children(server):
                commands.update(_cmdline(c) for c in _children(child))
            time.sleep(0.05)
        assert codes == [0]
        commands.discard("")  # one that ended as it was read
        assert commands == {_cmdline(server)}  # a fork of DVC's child: no shell, no new program
        assert capfd.readouterr().out == ""  # quiet
        assert "bootstrap" not in changed_stages(project)  # DVC recorded it in dvc.lock
        assert json.loads((project / "runs/bootstrap.json").read_text())["forked"] is True

        missing = dvc(address, ["repro", "--single-item", "no-such-stage"], str(project), env, True)
    assert missing != 0


def test_a_fresh_clone_starts_the_fork_server_before_prefect(tmp_path, monkeypatch):
    """A fresh clone has dvc.lock and the default params.yaml but none of the outputs: every
    stage will run, so the server's imports start at once (a warm checkout starts none)."""
    from pipelines import checks
    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.tracking.dvc import missing_outputs

    for name in ("params.yaml", "dvc.lock"):  # committed: what a clone has of them
        shutil.copy2(ROOT / name, tmp_path / name)
    started: list[str] = []
    monkeypatch.setattr(checks, "start_early", lambda kernels, threads: started.append(kernels))
    cfg = load_params(tmp_path / "params.yaml")
    recorded = missing_outputs(tmp_path)
    assert "models/base" in recorded and "reports/metrics.json" in recorded
    checks.start_fork_server_early(tmp_path, cfg)
    assert started == [cfg.runtime.cpu_kernels]

    for path in recorded:  # every recorded output in place, as after a run
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    assert missing_outputs(tmp_path) == []
    checks.start_fork_server_early(tmp_path, cfg)
    assert len(started) == 1

    (tmp_path / "dvc.lock").write_text("stages: [unclosed\n")  # DVC reports it, not this hint
    assert missing_outputs(tmp_path) == []
