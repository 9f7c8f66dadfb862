"""`dvc` as the pipeline runs it (qlora_pipeline.tracking.dvc_cli): dvc.lock rewritten through the
safe parser comes out byte for byte as DVC's own round trip writes it; dvc.yaml keeps going
through the round trip (its comments kept); and a real `dvc repro` records the same lock."""

from __future__ import annotations

import shutil
import subprocess
import sys

import dvc.dvcfile
import pytest
from conftest import ROOT
from dvc.utils.serialize import _yaml

from qlora_pipeline.tracking import dvc_cli

ANALYTICS_OFF = ["core.analytics", "false"]  # as the project's .dvc/config has it


@pytest.fixture
def fast(monkeypatch):
    """`lock_fast_path` installed for the test only."""
    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", _yaml.modify_yaml)
    dvc_cli.lock_fast_path()
    dvc_cli.lock_fast_path()  # idempotent: wrapped once
    return dvc.dvcfile.modify_yaml


def _stage_update(data: dict) -> None:
    """What `Lockfile.dump_stages` does to the parsed lock after a stage ran: its entry replaced,
    a new one appended (values of every kind a lock holds, and some it might)."""
    data["stages"]["prepare"]["outs"][0]["md5"] = "0123456789abcdef0123456789abcdef.dir"
    data["stages"]["prepare"]["outs"][0]["size"] = 123456789
    data["stages"]["new@stage-0"] = {
        "cmd": "qlora-pipeline train qlora --seed 0 # a 'quoted' \"cmd\": with: colons",
        "params": {
            "params.yaml": {
                "train.lr": 0.0002,
                "train.tiny": 1e-05,
                "train.none": None,
                "train.flag": True,
                "train.list": [1, 2.5, "three", None],
                "train.empty": {},
                "train.text": "naïve ünïcode — dash",
                "train.long": "word " * 30,
                "train.yes": "yes",
                "train.num": "007",
            }
        },
        "deps": [{"path": "src/x.py", "hash": "md5", "md5": "ab" * 16, "size": 0}],
    }


def test_the_lock_rewritten_through_the_safe_parser_has_dvcs_own_bytes(fast, tmp_path):
    fast_lock, own_lock = tmp_path / "fast" / "dvc.lock", tmp_path / "own" / "dvc.lock"
    for lock in (fast_lock, own_lock):
        lock.parent.mkdir()
        shutil.copy2(ROOT / "dvc.lock", lock)
    with fast(fast_lock) as data:
        assert type(data) is dict  # the safe parser's, not a round-trip CommentedMap
        _stage_update(data)
    with _yaml.modify_yaml(own_lock) as data:
        assert type(data) is not dict
        _stage_update(data)
    assert fast_lock.read_bytes() == own_lock.read_bytes()
    assert fast_lock.read_bytes() != (ROOT / "dvc.lock").read_bytes()  # the update landed

    started = {}  # no lock yet: DVC starts one
    for name, modify in (("fast", fast), ("own", _yaml.modify_yaml)):
        new = tmp_path / name / "new.lock"
        with modify(new) as data:
            data.update({"schema": "2.0", "stages": {}})
            data["stages"]["prepare"] = {"outs": [{"path": "data/prepared", "md5": "0" * 32}]}
        started[name] = new.read_bytes()
    assert started["fast"] == started["own"]


def test_dvc_yaml_still_goes_through_the_round_trip(fast, tmp_path):
    pipeline = tmp_path / "dvc.yaml"
    pipeline.write_text("stages:\n  a:  # kept\n    cmd: echo a\n")
    with fast(pipeline) as data:
        data["stages"]["a"]["cmd"] = "echo b"
    assert pipeline.read_text() == "stages:\n  a:  # kept\n    cmd: echo b\n"


def test_a_repro_through_dvc_cli_records_the_lock_dvc_records(tmp_path):
    """The same two-stage pipeline reproduced by `dvc` and by `dvc_cli` (each a process of its
    own): the same dvc.lock, byte for byte, after the first run and after a change."""
    locks = {}
    for how in (["-m", "dvc"], ["-m", "qlora_pipeline.tracking.dvc_cli"]):
        repo = tmp_path / how[1]
        repo.mkdir()
        (repo / "params.yaml").write_text("n: 3\nname: naïve\nrate: 1.0e-05\nnone:\n")
        (repo / "dvc.yaml").write_text(
            "stages:\n"
            "  one:\n    cmd: echo one > one.txt\n    params: [n, name, rate, none]\n"
            "    outs: [one.txt]\n"
            "  two:\n    cmd: cat one.txt one.txt > two.txt\n    deps: [one.txt]\n"
            "    outs: [two.txt]\n"
        )
        dvc = [sys.executable, "-m", "dvc"]
        for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", *ANALYTICS_OFF]):
            subprocess.run(cmd, cwd=repo, check=True)
        lock = []
        for n in (3, 4):
            text = (repo / "params.yaml").read_text().replace("n: 3", f"n: {n}")
            (repo / "params.yaml").write_text(text)
            for stage in ("one", "two"):
                cmd = [sys.executable, *how, "repro", "-q", "--single-item", stage]
                subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
            lock.append((repo / "dvc.lock").read_bytes())
        locks[how[1]] = lock
    assert locks["dvc"] == locks["qlora_pipeline.tracking.dvc_cli"]
    assert locks["dvc"][0] != locks["dvc"][1]


def test_after_warm_a_dvc_repro_imports_nothing_of_dvc_again(tmp_path):
    """What the fork server imports once (`warm`) is all a `dvc repro` child needs of DVC and
    its YAML, git and config libraries; a DVC upgrade that imports more as it runs fails here."""
    code = (
        "import sys; from qlora_pipeline.tracking import dvc_cli; dvc_cli.warm(); "
        "before = set(sys.modules); dvc_cli.main(['repro', '-q', '--single-item', 'a']); "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(FAMILIES)))"
    ).replace("FAMILIES", repr(("dvc", "ruamel", "dulwich", "configobj", "platformdirs", "fsspec")))
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", *ANALYTICS_OFF]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert (tmp_path / "dvc.lock").is_file()  # it ran
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
