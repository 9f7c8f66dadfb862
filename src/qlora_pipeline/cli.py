"""Command line: `qlora-pipeline run` (the whole flow) and one command per DVC stage."""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from qlora_pipeline.errors import ERROR_FILE_ENV, WRITE_ERRNOS, PipelineError
from qlora_pipeline.modeling.plan import KNOWN as KNOWN_SHAPES

DESCRIPTION = """\
QLoRA vs LoRA: fine-tune, evaluate with lm-eval, and report the quality gap.

  qlora-pipeline run [OVERRIDES...]     compose conf/ (+ Hydra overrides) into params.yaml and run
                                        the Prefect flow over the DVC stages (unchanged ones skip)
  qlora-pipeline run -m [--sweep-name NAME] train.lora.r=8,16 ...
                                        a sweep (Hydra multirun): each point its own workspace
                                        and DVC experiment, then sweeps/NAME/sweep.html
  qlora-pipeline retrain [OVERRIDES...] the unattended run: nothing changed -> no-op; otherwise run,
                                        commit the run, promote on PASS (exit 3 on FAIL)
  qlora-pipeline serve [--schedule NAME] [--pool POOL]
                                        retrain as a deployment on the cron schedule of
                                        conf/schedule/NAME.yaml (PREFECT_API_URL: the server)
  qlora-pipeline compose [OVERRIDES...] only write params.yaml (--check: fail if it is out of date)

Stage commands (what dvc.yaml runs; they read params.yaml):
  bootstrap | prepare | train {qlora,lora} [--seed N] | export {qlora,lora} [--seed N]
  evaluate {base,qlora,qlora_on_bf16,merged,lora} | quant-report | report
  (quant-report: per-layer NF4/FP4 error of the base, with and without double quantization,
  and the bits per parameter they take; a section of the report)
  (train and export default to the first of `seeds`; evaluate qlora/lora scores every seed)

Checks and planning:
  qlora-pipeline gate                   the report's quality-gate verdict; exit 1 on FAIL
  qlora-pipeline experiments            one line per run and DVC experiment: changed params,
                                        QLoRA, LoRA, gap [CI], noise floor, verdict, cost
  qlora-pipeline reproduce REV          recompute a recorded run (git revision or experiment)
                                        from nothing; exit 0 if its outputs are the same bytes

Registry (GTO git tags on the `qlora-adapter` artifact of dvc.yaml):
  qlora-pipeline promote [--rev REV]    register a committed run as a new version and put it in
                                        prod, only if its gate says PASS and the tree is clean
  qlora-pipeline promoted               the version in prod and its gate evidence
  qlora-pipeline history                every version: commit, verdict, gap [CI], noise floor
  qlora-pipeline rollback [--to V]      put an earlier version in prod (recorded like a promotion)
  qlora-pipeline freeze-test [--reset -m WHY]
                                        pin the evaluation set (data.frozen_test); the first
                                        retrain does it; --reset replaces it, committed on its own
  qlora-pipeline plan [--model ID] ...  training memory estimate per method; does it fit the GPU?

Overrides use Hydra syntax, e.g.  train.max_steps=200  data=local data.path=data/raw/my.jsonl
  model=llama-3.2-1b  'methods.qlora.quantization.quant_type=fp4'  train.lora.r=8
Config groups live in conf/: model, data, method (as methods.qlora / methods.lora), train, eval, report.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora-pipeline",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--params",
        default="params.yaml",
        help="composed config the stages read (default: %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="compose the config and run the whole pipeline as a Prefect flow"
    )
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.max_steps=200")
    run.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="a sweep (Hydra's multirun syntax: train.lora.r=8,16 "
        "methods.qlora.quantization.quant_type=nf4,fp4): every point runs as its own DVC "
        "experiment in its own workspace, orchestration.slots at a time, then a sweep report "
        "in <paths.sweeps>/<name>/",
    )
    run.add_argument(
        "--sweep-name",
        metavar="NAME",
        help="with -m: the sweep's name; its points are the experiments NAME-1, NAME-2, ... "
        "(default: sweep-<UTC date-time>)",
    )
    run.add_argument(
        "--trials",
        type=int,
        default=0,
        metavar="N",
        help="with -m: search instead of a grid, N trials of Hydra's Optuna sweeper (NSGA-II, "
        "seeded by `seed`; objectives: QLoRA score up, training memory down) over the sweep "
        "overrides, e.g. train.lora.r=choice(4,8,16) 'train.lr=tag(log,interval(1e-4,1e-3))'",
    )
    run.add_argument(
        "--keep",
        action="store_true",
        help="with -m: keep the points' workspaces (.dvc/tmp/sweeps/<name>/)",
    )
    rt = sub.add_parser(
        "retrain",
        help="the unattended run: no-op when nothing changed; else run, commit, and promote "
        "the adapter only if the gate says PASS (refuses a dirty work tree)",
    )
    rt.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.path=data/raw/new")
    sv = sub.add_parser(
        "serve",
        help="the retraining flow as a Prefect deployment on the cron schedule of "
        "conf/schedule/<name>.yaml, against the server PREFECT_API_URL names",
    )
    sv.add_argument(
        "--schedule", default="default", help="conf/schedule/<name>.yaml (default: %(default)s)"
    )
    sv.add_argument(
        "--pool",
        help="register on this work pool for a worker (`prefect worker start --pool NAME`) "
        "instead of serving the runs from this process",
    )
    comp = sub.add_parser("compose", help="compose conf/ (+ overrides) into params.yaml")
    comp.add_argument("overrides", nargs="*", help="Hydra overrides")
    comp.add_argument(
        "--check", action="store_true", help="exit 1 if params.yaml differs from conf/"
    )
    sub.add_parser("bootstrap", help="build/pre-train the tiny base model, or point at a hub model")
    sub.add_parser(
        "prepare", help="read or generate the data; clean, split, check, template, tokenize, save"
    )
    tr = sub.add_parser("train", help="fine-tune LoRA adapters with one method and seed")
    tr.add_argument("method", choices=["qlora", "lora"])
    ex = sub.add_parser(
        "export", help="merge one method's adapter into the bf16 base, verify, save safetensors"
    )
    ex.add_argument("method", choices=["qlora", "lora"])
    for cmd in (tr, ex):
        cmd.add_argument(
            "--seed",
            type=int,
            help="training seed, one of the config's `seeds` (default: the first, which ships)",
        )
    ev = sub.add_parser("evaluate", help="run lm-eval on one model (an arm: every seed)")
    ev.add_argument(
        "model",
        choices=["base", "qlora", "qlora_on_bf16", "merged", "lora"],
        help="qlora, lora: the arm as trained, one evaluation per training seed; qlora_on_bf16: "
        "the shipped QLoRA adapter on the unquantized bf16 base; merged: the shipped QLoRA "
        "adapter merged into the bf16 base (the export stage's output)",
    )
    sub.add_parser(
        "quant-report",
        help="per-layer NF4 vs FP4 error of the frozen base (relative MSE, SQNR, max error), "
        "with and without double quantization, and the measured bits per parameter against the "
        "theory; writes paths.quant/quantization.json",
    )
    sub.add_parser("report", help="write the quality-gap report")
    pl = sub.add_parser(
        "plan",
        help="estimate each arm's GPU memory for training and whether it fits (nothing is "
        "loaded); defaults: the configured recipe",
    )
    pl.add_argument(
        "--model",
        help="a folder with config.json, a config.json, a hub id, or one of "
        f"{', '.join(KNOWN_SHAPES)} (default: the configured base)",
    )
    pl.add_argument(
        "--seq-len", type=int, help="the longest row in tokens: the worst case (data.max_length)"
    )
    pl.add_argument(
        "--typical-len", type=int, help="a typical row's tokens, for the typical batch's peak"
    )
    pl.add_argument("--batch", type=int, help="rows per device step (train.batch_size)")
    pl.add_argument(
        "--gpu-gb",
        type=float,
        help="GPU memory in GiB (orchestration.gpu_memory_gb, else the visible GPU, else 80)",
    )
    pl.add_argument("--r", type=int, help="LoRA rank (train.lora.r)")
    pl.add_argument(
        "--optimizer",
        choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"],
        help="methods.<arm>.optimizer; paged ones can evict their state to CPU RAM",
    )
    pl.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16"],
        help="LoRA weights and gradients: float32 (peft's default, this pipeline) or bfloat16 "
        "(the QLoRA paper's recipe casts them)",
    )
    pl.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        help="gradient checkpointing (train.gradient_checkpointing)",
    )
    sub.add_parser(
        "gate",
        help="print the report's quality-gate verdict; exit 1 on FAIL (for CI and schedules)",
    )
    pr = sub.add_parser(
        "promote", help="register a committed run whose gate says PASS and put it in prod"
    )
    pr.add_argument("--rev", default="HEAD", help="the commit holding the run (default: HEAD)")
    pr.add_argument("-m", "--message", default="", help="a note kept in the version's tag")
    fz = sub.add_parser(
        "freeze-test",
        help="freeze the test split the data gives now as the evaluation set of every later run "
        "(data.frozen_test, DVC-tracked); the first `retrain` does this itself",
    )
    fz.add_argument(
        "--reset",
        action="store_true",
        help="replace an existing frozen set: runs on it are not compared with versions judged "
        "on the old one (the comparisons restart); committed as a decision of its own (needs a "
        "clean work tree)",
    )
    fz.add_argument("-m", "--message", default="", help="why the evaluation set changes (--reset)")
    fz.add_argument(
        "overrides", nargs="*", help="Hydra overrides for the data to freeze from (as for run)"
    )
    sub.add_parser(
        "experiments",
        help="one line per commit and DVC experiment (`dvc exp show --json`): changed params, "
        "QLoRA, LoRA, gap [95%% CI], noise floor, verdict, QLoRA footprint, stage time",
    )
    rp = sub.add_parser(
        "reproduce",
        help="recompute a recorded run from nothing (a clean worktree of the revision, every "
        "stage forced, DVC's run cache off) and compare its outputs' hashes with the recorded "
        "dvc.lock: exit 0 if identical, 1 with what moved (environment, scores vs noise floor)",
    )
    rp.add_argument("rev", help="a git revision or a DVC experiment name")
    rp.add_argument("--keep", action="store_true", help="keep the workspace (.dvc/tmp/reproduce/)")
    sub.add_parser("promoted", help="the version in prod and its gate evidence")
    sub.add_parser("history", help="every registered version with its gate evidence")
    rb = sub.add_parser("rollback", help="put an earlier version in prod")
    rb.add_argument("--to", help="the version (default: the one registered before the current)")
    return p


STAGES = ("bootstrap", "prepare", "train", "export", "evaluate", "quant-report", "report")


def stage_name(args: argparse.Namespace) -> str:
    """The DVC stage a command runs: `train qlora --seed 1` is `train@qlora-1` (a matrix stage),
    `export qlora` is `export@qlora`."""
    item = getattr(args, "method", None) or getattr(args, "model", None)
    if args.command == "train":
        item = f"{item}-{args.seed}"
    return f"{args.command}@{item}" if item else args.command


def training_seed(args: argparse.Namespace, seeds: list[int]) -> int:
    """`--seed`, which must be one of the config's `seeds`; by default the first (it ships)."""
    if args.seed is None:
        return seeds[0]
    if args.seed not in seeds:
        raise PipelineError(f"--seed {args.seed}: not in config key 'seeds' {list(seeds)}")
    return int(args.seed)


def _stage(args: argparse.Namespace) -> None:
    """Run one stage: pin the CPU kernels before torch loads, run the step, record its cost."""
    import time

    from qlora_pipeline.config.schema import load_params
    from qlora_pipeline.files import seed_dir
    from qlora_pipeline.runtime import keep_freed_memory, pin_cpu, setup_torch
    from qlora_pipeline.tracking.revisions import require_pinned

    cfg = load_params(args.params)
    require_pinned(cfg)
    started = time.perf_counter()
    pin_cpu(cfg.runtime.cpu_kernels, cfg.runtime.threads)
    keep_freed_memory()
    setup_torch(cfg.seed)
    p = cfg.paths
    if args.command in ("train", "export"):
        args.seed = training_seed(args, cfg.seeds)
    if args.command == "bootstrap":
        from qlora_pipeline.modeling.bootstrap import bootstrap

        bootstrap(cfg.model, cfg.seed, p.base)
    elif args.command == "prepare":
        from qlora_pipeline.data.prepare import prepare
        from qlora_pipeline.modeling.load import base_context, load_tokenizer

        trust = cfg.model.trust_remote_code
        tokenizer, context = load_tokenizer(p.base, trust), base_context(p.base, trust)
        prepare(cfg.data, tokenizer, cfg.seed, p.data, context)
    elif args.command == "train":
        from qlora_pipeline.training.train import train

        adapter = seed_dir(Path(p.adapters) / args.method, args.seed)
        train(cfg, args.method, args.seed, p.base, p.data, adapter)
    elif args.command == "export":
        from qlora_pipeline.modeling.export import export

        adapter = seed_dir(Path(p.adapters) / args.method, args.seed)
        export(cfg, args.method, p.base, adapter, p.data, Path(p.exports) / args.method)
    elif args.command == "evaluate":
        from qlora_pipeline.evaluation.evaluate import evaluate

        evaluate(cfg, args.model, p.base, p.data, p.adapters, Path(p.eval) / args.model, p.exports)
    elif args.command == "quant-report":
        from qlora_pipeline.modeling.load import compute_dtype
        from qlora_pipeline.modeling.quantstats import write_quant_report

        method = cfg.methods["qlora"]
        q = method.quantization
        assert q is not None  # the schema requires it
        dtype = compute_dtype(method.base_dtype)  # what the loader hands bitsandbytes
        write_quant_report(
            p.base, (q.quant_type, q.double_quant), list(q.skip_modules), dtype, p.quant
        )
    elif args.command == "report":
        from qlora_pipeline.reporting.report import build_report

        build_report(cfg, p.data, p.adapters, p.eval, p.report, p.exports, p.quant)
    from qlora_pipeline.tracking.perf import write_record

    write_record(p.runs, stage_name(args), Path(args.params), started)


REGISTRY = ("promote", "promoted", "history", "rollback")


def registry_command(args: argparse.Namespace, root: Path) -> int:
    """promote | promoted | history | rollback: the GTO registry of the shipped adapter."""
    from qlora_pipeline.tracking import registry

    if args.command == "promote":
        version = registry.promote(root, args.rev, args.message)
        print(
            f"promoted {args.rev} as {registry.ARTIFACT} {version} ({registry.STAGE}); share it "
            "with `git push --tags` and the adapter with `dvc push`"
        )
        return 0
    if args.command == "rollback":
        print(f"{registry.STAGE} is now {registry.ARTIFACT} {registry.rollback(root, args.to)}")
        return 0
    current = registry.current_version(root)
    if args.command == "promoted":
        if current is None:
            print(f"nothing in {registry.STAGE} yet (qlora-pipeline promote)", file=sys.stderr)
            return 1
        metrics = registry.committed_metrics(root, current["commit"])
        print(
            f"{registry.ARTIFACT} {current['version']} in {registry.STAGE} since "
            f"{current['created_at']} ({current['tag']}, by {current['author']})\n"
            f"commit {current['commit']}\n{registry.evidence(metrics)}"
        )
        return 0
    for v in registry.versions(root):
        mark = "  <- " + registry.STAGE if current and v["version"] == current["version"] else ""
        summary = registry.evidence(v["metrics"]).replace("\n", "; ")
        print(f"{v['version']}  {v['commit'][:7]}  {v['created_at'][:19]}  {summary}{mark}")
    return 0


def freeze_command(args: argparse.Namespace, root: Path) -> int:
    """freeze-test [--reset -m WHY]: pin the evaluation set; a reset is committed on its own."""
    from qlora_pipeline.tracking.dvc import freeze_test, pinned_params
    from qlora_pipeline.tracking.registry import git, require_clean

    if args.reset:
        if not args.message:
            raise PipelineError("freeze-test --reset needs -m WHY: the decision is recorded")
        require_clean(root)
    os.chdir(root)
    _, cfg = pinned_params(root, args.overrides)
    path, n = freeze_test(root, cfg, reset=args.reset)
    rel = path.relative_to(root)
    if args.reset:
        if not git(root, "status", "--porcelain", "--", f"{rel}.dvc"):
            raise PipelineError(
                f"{rel}: the data gives the test split that is frozen already; nothing to reset"
            )
        git(root, "add", "--", f"{rel}.dvc", str(rel.parent / ".gitignore"))
        git(root, "commit", "-q", "-m", f"Evaluation set reset: {args.message} ({n} items)")
        print(f"froze {n} test items -> {rel} and committed the reset; push with `dvc push`")
    else:
        print(f"froze {n} test items -> {rel}; commit {rel}.dvc, push with `dvc push`")
    return 0


def fail(message: str) -> int:
    """Say `message` as one line and exit 2; a stage command also leaves it where the flow that
    runs it reads it (ERROR_FILE_ENV)."""
    line = " ".join(message.split())
    print(f"error: {line}", file=sys.stderr)
    where = os.environ.get(ERROR_FILE_ENV)
    if where:
        Path(where).write_text(line + "\n", encoding="utf-8")
    return 2


def _pin_hash_seed(argv: list[str] | None) -> None:
    """Re-execute once with PYTHONHASHSEED=0 so set iteration order (peft's target_modules, for
    one) is the same in every process; only for a real command line (argv None), not in tests."""
    if argv is not None or os.environ.get("PYTHONHASHSEED") == "0":
        return
    env = dict(os.environ, PYTHONHASHSEED="0")
    os.execve(sys.executable, [sys.executable, "-m", "qlora_pipeline", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    """The command line `argv` (None: this process' own, which then ends here, `end`)."""
    code = _command(argv)
    if argv is None:
        end(code)
    return code


def end(code: int) -> NoReturn:
    """End this process with `code` once its exit handlers ran (Prefect's log and event
    workers drained, temporary folders removed) and its output is flushed, without the
    interpreter's teardown of every module: after a run (Prefect, DVC, Hydra, matplotlib, ...)
    that took about 1 s (benchmarks/bench_run_end.py)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command in STAGES:
        from qlora_pipeline.forkserver import delegate

        code = delegate(list(sys.argv[1:] if argv is None else argv), args.params)
        if code is not None:
            return code
        _pin_hash_seed(argv)
    from qlora_pipeline.runtime import log, setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command in ("run", "retrain", "serve", "reproduce"):
            from qlora_pipeline.tracking.dvc import find_root

            root = find_root()
            # Prefect keeps its database under PREFECT_HOME: a project-local, git-ignored folder,
            # so runs and tests don't fight over one database. Set before prefect is imported.
            os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
            # No network here: the server's telemetry would log "Failed to send telemetry" as an
            # ERROR on every run, which reads as a failure.
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            # A stage waiting for a slot of the concurrency limit retries after the server's
            # Retry-After, by default up to 30 s (the average slot occupancy): the slot would sit
            # idle between stages. 1 s for the temporary server a run starts; set it on yours.
            os.environ.setdefault(
                "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "1"
            )
            # The temporary server gets 20 s to answer by default; a busy machine (both cores
            # training) has been seen to need more, and a timeout fails the whole run.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
            if args.command == "serve":
                from pipelines.serve import serve

                return serve(root, args.schedule, args.pool)
            if (
                args.command == "run"
                and not args.multirun
                and (args.trials or args.sweep_name or args.keep)
            ):
                return fail("--sweep-name, --trials and --keep belong to a sweep: add -m")
            from pipelines import api

            api.start()  # boots while the config is checked and the flow imported
            try:
                sweep = args.command == "run" and args.multirun
                if args.command in ("run", "retrain") and not sweep:
                    from pipelines.checks import prelaunch

                    cfg = prelaunch(root, args.overrides)  # before Prefect is imported
                from pipelines import flow

                if args.command == "reproduce":
                    return flow.reproduce(root, args.rev, args.keep)
                if sweep:
                    return flow.sweep(root, args.overrides, args.sweep_name, args.trials, args.keep)
                entry = flow.run if args.command == "run" else flow.retrain
                return entry(root, args.overrides, cfg)
            finally:
                api.stop()
        if args.command == "compose":
            from qlora_pipeline.tracking.dvc import find_root, pinned_params, write_params

            root = find_root()
            if args.check:
                text, _ = pinned_params(root, args.overrides)
                current = (
                    (root / "params.yaml").read_text(encoding="utf-8")
                    if (root / "params.yaml").exists()
                    else ""
                )
                if current != text:
                    log.error("params.yaml is out of date with conf/; run `qlora-pipeline compose`")
                    return 1
                return 0
            write_params(root, args.overrides)
            log.info("wrote %s", root / "params.yaml")
            return 0
        if args.command == "plan":
            from qlora_pipeline.config.schema import load_params
            from qlora_pipeline.modeling.plan import (
                DTYPE_BYTES,
                configured_recipes,
                load_model_config,
                plan_table,
                prepared_median_length,
                visible_gpu_gib,
            )

            cfg = load_params(args.params)
            config, source = load_model_config(args.model, cfg)
            typical = args.typical_len  # or the configured data's median row, for its model
            if typical is None and args.model is None:
                typical = prepared_median_length(Path(cfg.paths.data))
            gpu = args.gpu_gb or cfg.orchestration.gpu_memory_gb or visible_gpu_gib() or 80
            recipes = configured_recipes(
                cfg,
                args.seq_len,
                args.batch,
                typical_len=typical,
                r=args.r,
                optimizer=args.optimizer,
                adapter_bytes=args.adapter_dtype and DTYPE_BYTES[args.adapter_dtype],
                checkpointing=args.checkpointing,
            )
            table, _ = plan_table(config, recipes, gpu)
            print(f"{source}:\n{table}")
            return 0
        if args.command == "freeze-test":
            from qlora_pipeline.tracking.dvc import find_root

            return freeze_command(args, find_root())
        if args.command in REGISTRY:
            from qlora_pipeline.tracking.dvc import find_root

            return registry_command(args, find_root())
        if args.command == "experiments":
            from qlora_pipeline.config.schema import load_params
            from qlora_pipeline.tracking.dvc import find_root
            from qlora_pipeline.tracking.experiments import experiments

            cfg = load_params(args.params)
            p = cfg.paths
            print(experiments(find_root(), cfg.eval.tasks[0], p.runs, p.report))
            return 0
        if args.command == "gate":
            from qlora_pipeline.config.schema import load_params
            from qlora_pipeline.reporting.gate import verdict_of

            return verdict_of(Path(load_params(args.params).paths.report) / "metrics.json")
        _stage(args)
        return 0
    except PipelineError as e:
        code = fail(str(e))
        if e.detail:
            print(e.detail, file=sys.stderr)
        return code
    except OSError as e:
        if errno.errorcode.get(e.errno or 0) not in WRITE_ERRNOS:
            raise
        # e.g. RLIMIT_FSIZE or a full disk: the output was being written under a temporary name
        # (files.atomic_dir), so nothing under a final name is half-written
        return fail(f"{e.filename or 'writing'}: {e.strerror}; earlier outputs are untouched")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
