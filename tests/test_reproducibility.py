"""Reproducible on any machine: pinned CPU kernels, no volatile bytes in outputs, pinned hub
revisions, the evaluation protocol, and the lock file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY
from packaging.version import Version

from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.files import sha256_dir
from qlora_pipeline.reporting.gate import comparable_accepted
from qlora_pipeline.runtime import PORTABLE_ENV, cpu_info, cpu_vendor, mkl_branch
from qlora_pipeline.tracking import revisions
from qlora_pipeline.tracking.dvc import compose, write_params

NATIVE_ISA = subprocess.run(
    [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
    capture_output=True,
    text=True,
    env={k: v for k, v in os.environ.items() if k not in PORTABLE_ENV},
).stdout.strip()


def test_this_process_runs_the_portable_kernels():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert not torch.backends.mkldnn.enabled
    assert {k: os.environ[k] for k in PORTABLE_ENV} == PORTABLE_ENV
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(NATIVE_ISA == "AVX2", reason="this CPU's best torch kernels are AVX2 already")
def test_pinning_after_torch_chose_its_kernels_is_refused():
    code = (
        "import torch; torch.backends.cpu.get_cpu_capability()\n"
        "from qlora_pipeline.runtime import pin_cpu\n"
        "pin_cpu('avx2', 2)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "torch was imported before the CPU kernels were pinned" in proc.stderr


# The bytes of one fp32 linear layer of the tiny model's MLP shape ((32 x 32 tokens) x 256 through a
# 768 x 256 weight, torch.randn from seed 0): the call its up and gate projections make in every
# pre-training step. Recorded on the AMD EPYC of 2026-12-03 with MKL on its Intel code path, where
# the reference run made on an Intel Xeon reproduced byte for byte (dvc.lock unchanged); MKL's own
# AMD path gives other bytes (the control below).
AVX2_GEMM_SHA256 = "ae711e6f857e90f5f3d0f5d792833a78cfc11acfe116ddb13ddecb72e1395656"
GEMM = (
    "import hashlib, torch\n"
    "g = torch.Generator().manual_seed(0)\n"
    "x, w = torch.randn(1024, 256, generator=g), torch.randn(768, 256, generator=g)\n"
    "print(hashlib.sha256(torch.nn.functional.linear(x, w).numpy().tobytes()).hexdigest())\n"
)
HAS_MKL = mkl_branch() is not None


@pytest.mark.skipif(not HAS_MKL, reason="this torch has no MKL")
def test_mkl_runs_its_avx2_branch_and_bytes_on_any_vendor(capsys):
    assert mkl_branch() == "AVX2"
    exec(GEMM, {})
    assert capsys.readouterr().out.strip() == AVX2_GEMM_SHA256


@pytest.mark.skipif(
    not HAS_MKL or cpu_vendor() in ("", "GenuineIntel"),
    reason="MKL takes its Intel code path on this CPU by itself",
)
def test_without_its_intel_code_path_mkl_gives_other_bytes_and_says_so(tmp_path):
    """The control for the test above, on a CPU of another vendor: no C compiler to build the
    dispatch library, so MKL keeps its vendor path, whatever MKL_CBWR asks."""
    code = "from qlora_pipeline.runtime import pin_cpu, setup_logging\nsetup_logging()\npin_cpu('avx2', 2)\n"
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    env.update(CC=str(tmp_path / "no-compiler"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", code + GEMM], capture_output=True, text=True, env=env, check=True
    )
    assert proc.stdout.strip() != AVX2_GEMM_SHA256
    assert "MKL runs its AUTO branch, not AVX2" in proc.stderr
    assert "no C compiler" in proc.stderr
    assert not (tmp_path / "cache" / "qlora-pipeline").exists() or not any(
        (tmp_path / "cache" / "qlora-pipeline").iterdir()
    )  # nothing half-built left behind


def test_cpu_info_reads_the_first_cpus_field_and_nothing_when_absent(tmp_path):
    info = tmp_path / "cpuinfo"  # the layout of Linux's /proc/cpuinfo: one block per CPU
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14  \n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: other\n",
        encoding="utf-8",
    )
    assert cpu_info("vendor_id", info) == "AuthenticAMD"
    assert cpu_info("model name", info) == "AMD EPYC 9R14"
    assert cpu_info("microcode", info) == ""
    assert cpu_info("vendor_id", tmp_path / "absent") == ""


def test_the_dispatch_library_is_loaded_only_from_a_folder_private_to_this_user(
    tmp_path, monkeypatch
):
    """A library every stage loads: one planted in a folder others may write is passed over, and
    the library is built in the next place, the temp folder, private to this user."""
    from qlora_pipeline import runtime

    monkeypatch.setattr(runtime, "cpu_vendor", lambda: "AuthenticAMD")  # builds on Intel too
    shared = tmp_path / "cache" / "qlora-pipeline"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert runtime.mkl_intel_dispatch() is None
    assert not any(shared.iterdir())
    (built,) = (tmp_path / "tmp").glob("qlora-pipeline-*/mkl-intel-dispatch-*.so")
    assert built.parent.stat().st_mode & 0o777 == 0o700

    shared.chmod(0o700)  # now a private folder, holding a library others may write: passed over
    planted = shared / built.name
    shutil.copy(built, planted)
    planted.chmod(0o666)
    (tmp_path / "tmp2").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp2"))
    monkeypatch.setattr(runtime.shutil, "which", lambda _: None)  # and nothing to build with
    assert "no C compiler" in runtime.mkl_intel_dispatch()


# Two machines on one: what a CPU offers (ISA caps for torch, oneDNN and MKL), its core count and
# thread environment. Portable kernels must make them irrelevant.
AVX512_MACHINE = {
    "ATEN_CPU_CAPABILITY": "avx512",
    "ONEDNN_MAX_CPU_ISA": "ALL",
    "MKL_CBWR": "AUTO",
    "OMP_NUM_THREADS": "4",
    "MKL_NUM_THREADS": "4",
}
AVX2_MACHINE = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
SHORT = [
    "seeds=[5]",  # one training seed, not the first of the default (it is passed on)
    "model.bootstrap.steps=30",
    "data.synthetic.n_train=200",
    "train.max_steps=8",
    "train.logging_steps=4",
    "train.eval_steps=4",
    "train.save_steps=null",
    "eval.limit=8",
    "eval.tasks=[qlora_answer_ll]",
]
STAGES = (
    ["bootstrap"],
    ["prepare"],
    ["train", "qlora"],
    ["train", "lora"],
    ["export", "qlora"],
    ["evaluate", "qlora"],
)
COMPOSING = threading.Lock()
OUTPUTS = ("models/base", "data/prepared", "models/adapters", "models/export", "results/eval")


def _machine(folder: Path, machine: dict[str, str], overrides: list[str], stages=STAGES) -> dict:
    """Run stages through the CLI in `folder` as a machine with `machine`'s environment; one core
    for the AVX2 machine. Returns the sha256 of every output folder."""
    folder.mkdir(parents=True)
    with COMPOSING:  # Hydra's state is global: one composition at a time
        text, _ = compose(ROOT, [*TINY, *SHORT, *overrides])
    (folder / "params.yaml").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV and k != "PYTHONHASHSEED"}
    env.update(machine)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    one_core = machine is AVX2_MACHINE and hasattr(os, "sched_setaffinity")
    for stage in stages:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "qlora-pipeline"), *stage],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if one_core else None,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {out: sha256_dir(folder / out) for out in OUTPUTS if (folder / out).exists()}


@pytest.mark.slow
@pytest.mark.skipif(NATIVE_ISA == "AVX2", reason="needs a CPU with more than AVX2 to emulate two")
def test_native_kernels_differ_between_the_emulated_cpus(tmp_path):
    """The control: without pinning, the two emulated machines really compute differently."""
    native = ["runtime.cpu_kernels=native"]
    with ThreadPoolExecutor(2) as machines:
        a_run = machines.submit(_machine, tmp_path / "a", AVX512_MACHINE, native, STAGES[:1])
        b_run = machines.submit(_machine, tmp_path / "b", AVX2_MACHINE, native, STAGES[:1])
        a, b = a_run.result(), b_run.result()
    assert a["models/base"] != b["models/base"]


@pytest.mark.slow
def test_portable_kernels_give_the_same_bytes_on_both_emulated_cpus(tmp_path):
    """Base model, prepared data, adapters, export and evaluation: identical bytes, in different
    folders, on different ISA caps, core counts and thread environments."""
    with ThreadPoolExecutor(2) as machines:  # side by side: only the bytes are compared
        a_run = machines.submit(_machine, tmp_path / "a", AVX512_MACHINE, [])
        b_run = machines.submit(_machine, tmp_path / "b-other-folder", AVX2_MACHINE, [])
        a, b = a_run.result(), b_run.result()
    assert set(a) == set(OUTPUTS)
    assert a == b
    record = yaml.safe_load((tmp_path / "a/runs/train@qlora-5.json").read_text())
    assert record["tokens_per_s"] > 0 and record["environment"]["cpu_capability"] == "AVX2"
    assert [r["step"] for r in record["steps"]] == [4, 8]


def _project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_a_moving_hub_revision_is_pinned_to_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "hub/models--meta-llama--Llama-3.2-1B/refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = _project(tmp_path / "p")
    cfg = write_params(root, ["model=llama-3.2-1b"])
    assert cfg.model.revision == sha
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["revision"] == sha
    revisions.require_pinned(cfg)  # a pinned config passes the stages' check


def test_an_unpinnable_revision_names_the_key(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = _project(tmp_path / "p")
    with pytest.raises(ConfigError, match=r"'model\.revision': cannot pin model 'meta-llama"):
        write_params(root, ["model=llama-3.2-1b"])
    assert not (root / "params.yaml").exists()
    _, cfg = compose(root, ["model=llama-3.2-1b"])  # as `dvc exp run` composes it: not pinned
    with pytest.raises(ConfigError, match=r"'model\.revision'.*moving name"):
        revisions.require_pinned(cfg)


PROTOCOL = {
    "lm_eval": "0.4.13",
    "tasks": {"qa": {"version": 1.0, "num_fewshot": 0, "config_sha256": "aa"}},
    "batch_size": 64,
}


def test_an_accepted_run_under_another_protocol_is_refused_naming_the_difference():
    accepted = {
        "protocol": {**PROTOCOL, "tasks": {"qa": {**PROTOCOL["tasks"]["qa"], "num_fewshot": 5}}},
        "test_set": "t",
    }
    with pytest.raises(
        PipelineError, match=r"tasks\.qa\.num_fewshot: 5 → 0.*allow_protocol_change"
    ):
        comparable_accepted(accepted, "HEAD", PROTOCOL, "t", allow_change=False)
    compared, note = comparable_accepted(accepted, "HEAD", PROTOCOL, "t", allow_change=True)
    assert compared is accepted and "compared anyway" in note


def test_a_run_on_another_evaluation_set_is_not_compared():
    compared, note = comparable_accepted(
        {"protocol": PROTOCOL, "test_set": "old"}, "HEAD", PROTOCOL, "new", False
    )
    assert compared is None
    assert note == (
        "HEAD: evaluated on another evaluation set; not compared (a reset of the evaluation "
        "set restarts the comparisons)"
    )
    compared, _ = comparable_accepted(
        {"protocol": PROTOCOL, "test_set": "new"}, "HEAD", PROTOCOL, "new", False
    )
    assert compared is not None
    compared, note = comparable_accepted({"tasks": {}}, "HEAD", PROTOCOL, "new", False)
    assert compared is None and "records no evaluation protocol" in note


def test_the_lock_pins_what_is_installed():
    lock = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1].strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for name in (
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "lm-eval",
        "prefect",
        "dvc",
        "hydra-core",
    ):
        if name == "torch" and torch.version.cuda:
            continue  # GPU machines keep their own CUDA torch (setup.sh drops the lock's line)
        assert lock[name] == Version(version(name)).public, name


def test_a_task_added_or_dropped_is_not_a_protocol_change_for_the_shared_tasks():
    two = {**PROTOCOL, "tasks": {**PROTOCOL["tasks"], "ll": {"version": 1.0, "num_fewshot": 0}}}
    compared, _ = comparable_accepted(
        {"protocol": two, "test_set": "t"}, "HEAD", PROTOCOL, "t", False
    )
    assert compared is not None
    compared, note = comparable_accepted(
        {"protocol": {**PROTOCOL, "tasks": {"other": {}}}, "test_set": "t"},
        "HEAD",
        PROTOCOL,
        "t",
        False,
    )
    assert compared is None and "no evaluation task in common" in note
