"""DVC's YAML work with ruamel.yaml's C parser and without it, side by side in one invocation.

Every stage's `dvc repro --single-item` parses dvc.yaml, params.yaml and dvc.lock with ruamel's
safe loader (its C parser when ruamel.yaml.clib is installed, which ruamel.yaml >= 0.19 no longer
installs by itself), then rewrites dvc.lock with a round-trip parse and dump (pure Python
either way). Two variants, one process each per round, the order alternating between rounds:
  - C: as installed (`ruamel.yaml.clib`);
  - pure: the same, with the C extension hidden (`_ruamel_yaml` blocked before any import).
Each process times, after its imports:
  - parse: DVC's `parse_yaml` of dvc.yaml, params.yaml and dvc.lock (what collecting a stage
    parses), the mean of 5;
  - status: `dvc status` of this project (every stage collected, deps hashed; DVC's state
    cache warm from the earlier rounds), the second of two;
  - lock rewrite: DVC's round-trip parse and dump of dvc.lock (what every stage that ran does).
Prints medians and pure/C per operation (geometric mean over rounds, 95% paired-bootstrap
interval), writes benchmarks/results/dvc_yaml.json.

    .venv/bin/python benchmarks/bench_dvc_yaml.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time

from common import ROOT, paired_ratio, write_results

VARIANTS = ("C", "pure")
OPS = ("parse", "status", "lock rewrite")


def child(variant: str) -> None:
    """One variant's timings, as JSON on stdout."""
    if variant == "pure":
        sys.modules["_ruamel_yaml"] = None  # type: ignore[assignment]  # ImportError on import
    from dvc.repo import Repo
    from dvc.utils.serialize._yaml import _dump, parse_yaml, parse_yaml_for_update
    from ruamel.yaml.main import CParser

    assert (CParser is None) == (variant == "pure"), "ruamel.yaml.clib is not installed"
    names = ("dvc.yaml", "params.yaml", "dvc.lock")
    texts = {n: (ROOT / n).read_text(encoding="utf-8") for n in names}
    t0 = time.perf_counter()
    for _ in range(5):
        for name, text in texts.items():
            parse_yaml(text, name)
    parse = (time.perf_counter() - t0) / 5
    with Repo(str(ROOT)) as repo:
        repo.status()
    with Repo(str(ROOT)) as repo:
        t0 = time.perf_counter()
        repo.status()
        status = time.perf_counter() - t0
    t0 = time.perf_counter()
    _dump(parse_yaml_for_update(texts["dvc.lock"], "dvc.lock"), io.StringIO())
    rewrite = time.perf_counter() - t0
    print(json.dumps({"parse": parse, "status": status, "lock rewrite": rewrite}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="processes per variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import numpy as np

    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            out = subprocess.run(
                [sys.executable, __file__, "--child", v],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    table = {v: {op: statistics.median(x[op] for x in runs[v]) for op in OPS} for v in VARIANTS}
    ratio = {
        op: paired_ratio(
            np.array([x[op] for x in runs["pure"]]), np.array([x[op] for x in runs["C"]])
        )
        for op in OPS
    }
    print(f"{'operation':<14}{'C (ms)':>10}{'pure (ms)':>11}   pure/C [95% interval]")
    for op in OPS:
        q = ratio[op]
        print(
            f"{op:<14}{1e3 * table['C'][op]:>10.1f}{1e3 * table['pure'][op]:>11.1f}"
            f"   {q['estimate']:.2f} [{q['ci_low']:.2f}, {q['ci_high']:.2f}]"
        )
    lock_lines = len((ROOT / "dvc.lock").read_text(encoding="utf-8").splitlines())
    write_results(
        ROOT / "benchmarks" / "results" / "dvc_yaml.json",
        {
            "rounds": args.rounds,
            "dvc_lock_lines": lock_lines,
            "median_s": table,
            "pure_over_c": ratio,
        },
    )


if __name__ == "__main__":
    main()
