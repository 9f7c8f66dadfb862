"""The Prefect flows: the DAG declared in dvc.yaml, one Prefect task per DVC stage.

DVC hashes inputs, skips unchanged stages and records lineage in dvc.lock; Prefect orders the
tasks, retries, logs and publishes the report as a markdown artifact.

`qlora-pipeline run` is the `qlora-pipeline` flow. `qlora-pipeline retrain` is the
`qlora-retrain` flow, the unattended one: a no-op when nothing changed; otherwise the same stages,
a commit of the run, and a promotion of the shipped adapter only when the gate says PASS, inside a
Prefect transaction that takes the promotion back when pushing it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed, State
from prefect.transactions import get_transaction, transaction

from pipelines import api
from pipelines.checks import check_overrides
from qlora_pipeline.config.schema import PipelineConfig, PromotionConfig, load_params
from qlora_pipeline.errors import PipelineError, StageInputError
from qlora_pipeline.files import read_json
from qlora_pipeline.forkserver import ENV as FORKSERVER_ENV
from qlora_pipeline.forkserver import serving, sharing, start_early
from qlora_pipeline.reporting.document import score_rows
from qlora_pipeline.reporting.gate import read_verdict
from qlora_pipeline.reporting.report import write_documents
from qlora_pipeline.tracking import registry, workspace
from qlora_pipeline.tracking.dvc import (
    changed_stages,
    compose,
    repro,
    stage_env,
    stage_order,
    write_params,
)
from qlora_pipeline.tracking.perf import config_hash
from qlora_pipeline.tracking.registry import git
from qlora_pipeline.tracking.runlock import exclusive


@task(task_run_name="compose params.yaml")
def compose_task(root: str, overrides: list[str]) -> dict:
    cfg = write_params(Path(root), overrides)
    get_run_logger().info("composed conf/ %s -> params.yaml", " ".join(overrides) or "(defaults)")
    return {"paths": vars(cfg.paths)}


BAD_INPUT = "BadInput"  # the state name of a stage stopped by a problem the user can fix


def _retry_unless_bad_input(task: object, task_run: object, state: State) -> bool:
    return state.name != BAD_INPUT  # the same input fails the same way: no retry


# A task run that asks for a slot as soon as it starts races the server's own write of its Running
# state. On Prefect's SQLite database the slot request then fails ("database is locked", HTTP 503)
# and the client retries it 2 s later: most stages lost 2 s that way. Asked 0.1 s later, it does
# not race (benchmarks/bench_slot_wait.py measures both).
SLOT_PAUSE_S = 0.1


@contextmanager
def hold_slot(limit: str, pause_s: float = SLOT_PAUSE_S) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `limit` for the block."""
    time.sleep(pause_s)
    with concurrency(limit, occupy=1, strict=True):
        yield


@task(task_run_name="{stage} [config {config}]", retry_condition_fn=_retry_unless_bad_input)
def stage_task(
    root: str,
    stage: str,
    config: str,
    slots: str,
    forkserver: str,
    stale: bool = True,
    force: bool = False,
) -> str | State:
    """Reproduce one DVC stage (skipped by DVC when nothing it depends on changed), holding one
    slot of the global concurrency limit `slots`. Its command runs in the fork server at
    `forkserver` (an address, never the environment: Prefect stores task parameters). A stage
    that is not `stale` (see `stale_stages`) is not handed to DVC at all; with `force` it is
    recomputed whatever DVC has recorded or cached (`reproduce`).

    A stage stopped by bad input ends as a Failed state named BadInput holding its one line, not
    an exception: not retried, no traceback."""
    if not stale:
        get_run_logger().info("%s: unchanged since dvc.lock (dvc status), not run", stage)
        return stage
    with hold_slot(slots):
        get_run_logger().info("dvc repro --single-item %s", stage)
        try:
            repro(Path(root), stage, stage_extra_env(root, forkserver, force), force)
        except StageInputError as e:
            return Failed(name=BAD_INPUT, message=str(e))
    return stage


@task(task_run_name="publish report")
def publish_task(root: str) -> str:
    """Render report.md/html again with this run's records, publish it as a Prefect artifact."""
    cfg = load_params(Path(root) / "params.yaml")
    p = cfg.paths
    exports = Path(root) / p.exports
    write_documents(
        cfg,
        Path(root) / p.data,
        Path(root) / p.adapters,
        Path(root) / p.report,
        exports if exports.is_dir() else None,
        Path(root) / p.runs,
        Path(root) / p.quant,
    )
    report = Path(root) / p.report / "report.md"
    text = report.read_text(encoding="utf-8")
    create_markdown_artifact(markdown=text, key="quality-gap-report", description="QLoRA vs LoRA")
    metrics = read_json(Path(root) / p.report / "metrics.json")
    create_table_artifact(
        table=score_rows(metrics), key="quality-gap-scores", description="scores [95% CI]"
    )
    return str(report)


def set_slots(name: str, slots: int) -> None:
    """Create or resize the global concurrency limit every heavy stage holds a slot of."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)


def run_graph(
    order: list[tuple[str, list[str]]],
    submit: Callable[[str, list[PrefectFuture]], PrefectFuture],
    slots: int,
    heavy: set[str],
) -> State | None:
    """Submit each stage of `order` (name, upstream names) once its upstream stages completed,
    so independent ones run side by side, at most `slots` of the `heavy` ones at a time (in
    `order`'s order); after a failure, submit nothing more and let the running ones finish. The
    first failed state, or None when every stage completed.

    A heavy stage is only submitted when a slot of the concurrency limit is free for it: one
    submitted earlier would wait for it, asking the server again only after the Retry-After it
    is told (about the limit's average occupancy, up to 30 s), and start that late."""
    waiting = dict(order)
    running: dict[str, PrefectFuture] = {}
    done: dict[str, PrefectFuture] = {}
    failed: State | None = None
    while waiting or running:
        for name, upstream in list(waiting.items()):
            if failed is not None or not all(u in done for u in upstream):
                continue
            if name in heavy and len(heavy.intersection(running)) >= slots:
                continue
            running[name] = submit(name, [done[u] for u in upstream])
            del waiting[name]
        if not running:
            break
        future = next(as_completed(list(running.values())))
        name = next(n for n, f in running.items() if f is future)
        del running[name]
        future.wait()  # as_completed yields when the task's thread ends; its state settles here
        if future.state.is_completed():
            done[name] = future
        elif failed is None:
            failed = future.state
    return failed


def own_code(root: str) -> str:
    """An import path with `root`'s own `src/` first: a reproduction runs the revision's code,
    not this checkout's."""
    return os.pathsep.join(filter(None, [str(Path(root) / "src"), os.environ.get("PYTHONPATH")]))


def stage_extra_env(root: str, forkserver: str, force: bool) -> dict[str, str]:
    """What a stage command gets on top of the run's environment: the fork server's address;
    for a reproduction (`force`), the revision's own code first on the import path."""
    return {FORKSERVER_ENV: forkserver, **({"PYTHONPATH": own_code(root)} if force else {})}


def stale_stages(order: list[tuple[str, list[str]]], changed: set[str]) -> set[str]:
    """The stages that may run: those `dvc status` reports changed, and every stage downstream of
    one (its inputs change once that one reruns; DVC then decides). The others are up to date."""
    stale: set[str] = set()
    for name, upstream in order:  # dependency order
        if name in changed or stale.intersection(upstream):
            stale.add(name)
    return stale


def run_stages(root: str, force: bool = False) -> str | State:
    """Every stage of dvc.yaml as a task run started once the stages it depends on completed,
    at most `orchestration.slots` at once, then the report published; its path, or the first
    failed stage's state.

    The stage commands run in one fork server (`qlora_pipeline.forkserver`): the libraries are
    imported once for the run, not once per stage.
    """
    cfg = load_params(Path(root) / "params.yaml")
    o = cfg.orchestration
    set_slots(o.limit, o.slots)
    config = config_hash(Path(root) / "params.yaml")[:8]
    stage = stage_task.with_options(retries=o.retries, retry_delay_seconds=o.retry_delays_s)
    order = stage_order(Path(root))
    if force:
        stale = {name for name, _ in order}
    else:
        stale = stale_stages(order, set(changed_stages(Path(root))))  # one `dvc status` for all
    # no stage to run: no fork server; a reproduction's server imports the revision's code
    code = own_code(root) if force else None
    server = serving(cfg.runtime.cpu_kernels, cfg.runtime.threads, code) if stale else None
    with server or nullcontext("") as address:
        failed = run_graph(
            order,
            lambda name, upstream: stage.submit(
                root,
                name,
                config,
                o.limit,
                address,
                name in stale,
                force,
                return_state=False,
                wait_for=upstream,
            ),
            o.slots,
            stale,
        )
    if failed is not None:  # a state of its own: a task run's state would be summarized away
        return Failed(name=failed.name, message=failed.message)
    return publish_task(root)


@flow(name="qlora-pipeline")
def pipeline_flow(root: str, overrides: list[str]) -> str | State:
    """Compose the config, run every stage of dvc.yaml in dependency order, publish the report."""
    with exclusive(Path(root), "flow qlora-pipeline"):
        compose_task(root, overrides)
        report = run_stages(root)
    if isinstance(report, State):
        return report  # the failed stage's state is the run's
    get_run_logger().info("report: %s (and report.html, metrics.json beside it)", report)
    return str(report)


@flow(name="qlora-reproduce")
def reproduce_flow(work: str) -> str | State:
    """Recompute every stage of a recorded run in its clean workspace `work` (its params.yaml as
    recorded: not composed again), nothing restored from DVC's caches."""
    with exclusive(Path(work), "flow qlora-reproduce"):
        report = run_stages(work, force=True)
    if isinstance(report, State):
        return report
    get_run_logger().info("recomputed in %s", work)
    return str(report)


def reproduce(root: Path, rev: str, keep: bool) -> int:
    """Entry point of `qlora-pipeline reproduce REV`: 0 when the outputs are the recorded bytes,
    1 when they differ (what moved, the environment, the scores against the noise floor), 2 on
    bad input."""
    from qlora_pipeline.tracking import reproduce as rp

    cfg = load_params(root / "params.yaml")
    sha = rp.resolve(root, rev, cfg.paths.report)
    work = rp.workspace(root, sha)
    print(f"reproducing {rev} ({sha[:7]}) from nothing in {work}")
    try:
        api.ready()
        state = reproduce_flow(str(work), return_state=True)
        if state.is_failed():
            return failure(state)
        same, said = rp.compare(root, sha, work, cfg.paths.runs, cfg.paths.report)
    finally:
        if not keep:
            workspace.remove(root, work)
    print(said)
    return 0 if same else 1


@task(task_run_name="point {name}")
def point_task(work: str, name: str, overrides: list[str]) -> dict | State:
    """One sweep point: the `qlora-pipeline` flow (the same stage tasks as a normal run) in its
    own workspace `work`, then saved as the DVC experiment `name`; the point's report row."""
    from qlora_pipeline.tracking import sweep as sw

    state = pipeline_flow(work, overrides, return_state=True)
    if state.is_failed():
        return Failed(name=state.name, message=f"point {name}: {state.message}")
    cfg = load_params(Path(work) / "params.yaml")
    sha = sw.save(Path(work), name, [cfg.paths.report, cfg.paths.runs])
    get_run_logger().info("point %s saved as DVC experiment %s (%s)", work, name, sha[:7])
    return sw.point_row(Path(work), cfg, name, overrides) | {"rev": sha}


def objectives(future: PrefectFuture) -> tuple[float, float] | None:
    """A finished point's QLoRA score (to maximize) and training memory in MB (to minimize)."""
    from qlora_pipeline.reporting.sweep import MB, training_bytes

    if not future.state.is_completed():
        return None
    row = future.result()
    return float(row["figures"]["qlora"]), training_bytes(row["train"])["total"] / MB


@flow(name="qlora-sweep", flow_run_name="{name}")
def sweep_flow(root: str, name: str, overrides: list[str], trials: int, keep: bool) -> State:
    """Every point of a sweep as its own flow run under this one, in its own workspace, at most
    `orchestration.slots` at once (the task runner's workers; their stages hold slots of the same
    global concurrency limit as every run). The points are Hydra's grid of `overrides`, or with
    `trials` the trials Hydra's Optuna sweeper asks for, a batch of `slots` at a time. The first
    point runs alone, so the stages every point shares (bootstrap, prepare, the base's
    evaluation) are computed once and the others restore them from DVC's run cache. Then the
    sweep report."""
    import tempfile

    from qlora_pipeline.reporting.sweep import write_sweep_report
    from qlora_pipeline.tracking import sweep as sw

    fixed, axes = sw.swept(overrides)
    points = [] if trials else sw.grid(overrides)
    _, cfg = compose(Path(root), points[0] if points else fixed)
    changes = workspace.uncommitted(Path(root))
    futures: list[PrefectFuture] = []
    works: list[Path] = []

    def launch(batch: list[list[str]]) -> list[PrefectFuture]:
        start = len(futures)
        queued = []
        for k, point in enumerate(batch, start + 1):
            works.append(
                sw.point_workspace(Path(root), name, f"{name}-{k}", changes, cfg.paths.runs)
            )
            queued.append((str(works[-1]), f"{name}-{k}", point))
        if not futures:  # the first point alone: what every point shares is computed once
            futures.append(point_task.submit(*queued.pop(0)))
            futures[-1].wait()
        futures.extend(point_task.submit(*q) for q in queued)
        for future in futures[start:]:
            future.wait()
        return futures[start:]

    search = None
    try:
        with sharing(cfg.runtime.cpu_kernels, cfg.runtime.threads):  # one for all the points
            if trials:
                with tempfile.TemporaryDirectory() as tmp:
                    search = sw.optuna_search(
                        axes,
                        trials,
                        cfg.orchestration.slots,
                        cfg.seed,
                        Path(tmp) / name,
                        lambda batch: [objectives(f) for f in launch([fixed + b for b in batch])],
                    )
            else:
                launch(points)
    finally:
        if not keep:
            for work in works:
                workspace.remove(Path(root), work)
    rows: list[dict] = [f.result() for f in futures if f.state.is_completed()]  # type: ignore[misc]
    failed = [f.state for f in futures if not f.state.is_completed()]
    report = None
    if rows:
        report = write_sweep_report(rows, Path(root) / cfg.paths.sweeps / name, name, search)
        create_markdown_artifact(
            markdown=report.read_text(encoding="utf-8"), key="sweep-report", description=name
        )
        get_run_logger().info("sweep report: %s (and sweep.html beside it)", report)
    if failed:
        return Failed(
            name=failed[0].name,
            message=f"{len(failed)} of {len(futures)} points failed; " + str(failed[0].message),
        )
    return Completed(message=f"{len(futures)} points; report: {report}")


def sweep(root: Path, overrides: list[str], name: str | None, trials: int, keep: bool) -> int:
    """Entry point of `qlora-pipeline run -m`: the overrides checked first (every grid point, or
    the fixed overrides of a search: one line naming the point), then the sweep flow."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from qlora_pipeline.tracking import sweep as sw

    fixed, axes = sw.swept(overrides)
    points = [fixed] if trials else sw.grid(overrides)
    name = name or sw.default_name()
    sw.check(root, name, trials or len(points), bool(axes) or not trials)
    cfgs = []
    for point, label in zip(points, sw.varying(points), strict=True):
        try:
            cfgs.append(check_overrides(root, point))
        except PipelineError as e:
            where = f"sweep point {' '.join(label)}: " if label else ""
            raise type(e)(f"{where}{e}", e.detail) from None
    start_early(cfgs[0].runtime.cpu_kernels, cfgs[0].runtime.threads)  # the points' fork server
    slots = cfgs[0].orchestration.slots
    what = f"{trials} Optuna trials" if trials else f"{len(points)} points"
    print(f"sweep {name}: {what}, {slots} at a time")
    runner = ThreadPoolTaskRunner(max_workers=slots)  # type: ignore[var-annotated]
    api.ready()
    state = sweep_flow.with_options(task_runner=runner)(  # type: ignore[arg-type]
        str(root), name, list(overrides), trials, keep, return_state=True
    )
    if state.is_failed():
        return failure(state)
    print(state.message)
    return 0


def _identity(p: PromotionConfig) -> list[str]:
    return ["-c", f"user.name={p.author_name}", "-c", f"user.email={p.author_email}"]


@task(task_run_name="commit the run")
def commit_task(root: str, cfg: PipelineConfig, message: str) -> str:
    """Commit what records the run (dvc.lock, params.yaml, the report, the run records) under
    the configured identity; its commit SHA."""
    files = ["dvc.lock", "params.yaml", cfg.paths.report, cfg.paths.runs]
    if cfg.data.frozen_test:  # the frozen evaluation set's .dvc file, once frozen
        files.append(str(Path(cfg.data.frozen_test).parent))
    git(root, "add", "-A", "--", *files)
    git(root, *_identity(cfg.promotion), "commit", "-q", "-m", message)
    sha = git(root, "rev-parse", "HEAD")
    get_run_logger().info("committed the run as %s", sha[:7])
    return sha


@task(task_run_name="freeze the evaluation set")
def freeze_task(root: str, overrides: list[str]) -> None:
    """Pin the test split as the evaluation set of every later run (`qlora-pipeline
    freeze-test`), before the first promotion is evaluated on it."""
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", "freeze-test", *overrides],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PipelineError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "freeze-test")
    get_run_logger().info(proc.stdout.strip())


@task(task_run_name="register and put in prod")
def promote_task(root: str, sha: str, p: PromotionConfig) -> str:
    """Register the run's commit as a new version and assign it `prod` (GTO tags)."""
    version = registry.promote(Path(root), sha, author=(p.author_name, p.author_email))
    txn = get_transaction()
    assert txn is not None  # promote_task runs inside retrain_flow's transaction
    txn.set("version", version)  # what on_rollback takes back
    get_run_logger().info("%s %s is in %s", registry.ARTIFACT, version, registry.STAGE)
    return version


@promote_task.on_rollback
def _take_back(txn) -> None:  # type: ignore[no-untyped-def]
    version = txn.get("version")
    registry.unpromote(Path(txn.get("root")), version)


@task(task_run_name="push the promoted run", retries=2, retry_delay_seconds=[2, 8])
def push_task(root: str, p: PromotionConfig) -> None:
    """Share the promotion: data, adapters and evaluations to the DVC remote, the run commit and
    the registry tags to the git remote (each only when configured)."""
    if p.dvc_remote:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "push", "-r", p.dvc_remote],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise PipelineError(f"dvc push -r {p.dvc_remote}: {proc.stderr.strip()[-500:]}")
    if p.git_remote:
        git(root, "push", "-q", p.git_remote, "HEAD")
        git(root, "push", "-q", p.git_remote, "--tags")


def check_work_tree(root: Path, cfg: PipelineConfig) -> None:
    """A retraining run commits: refuse a work tree with uncommitted changes, or on another
    branch than `promotion.branch`.

    Raises:
        PipelineError: naming the first changed file, or the two branches.
    """
    registry.require_clean(root)
    branch = git(str(root), "rev-parse", "--abbrev-ref", "HEAD")
    wanted = cfg.promotion.branch
    if wanted and branch != wanted:
        raise PipelineError(
            f"the work tree is on '{branch}', config key 'promotion.branch' is '{wanted}'; "
            f"check out '{wanted}' first"
        )


@task(task_run_name="check the work tree")
def check_task(root: str, overrides: list[str]) -> None:
    check_work_tree(Path(root), check_overrides(Path(root), overrides))


@flow(name="qlora-retrain")
def retrain_flow(root: str, overrides: list[str]) -> State:
    """The scheduled retraining run: no-op when data, config and code are unchanged; otherwise
    run, commit, and promote only on PASS (all or nothing). One run per checkout at a time."""
    with exclusive(Path(root), "flow qlora-retrain"):
        return retraining(root, overrides)


def retraining(root: str, overrides: list[str]) -> State:
    """The body of `retrain_flow`, inside its flow run and the checkout's run lock."""
    logger = get_run_logger()
    check_task(root, overrides)  # again here: a served deployment's runs start in this flow
    compose_task(root, overrides)
    cfg = load_params(Path(root) / "params.yaml")
    current = registry.current_version(Path(root))
    in_prod = "nothing" if current is None else f"{registry.ARTIFACT} {current['version']}"
    stays = "prod stays empty" if current is None else f"{in_prod} stays in prod"
    # Only the report (a new promotion pinned, a gate threshold) is not a new model: the models
    # in the work tree were judged when they were committed. Nothing to train, commit or promote.
    changed = [s for s in changed_stages(Path(root)) if s != "report"]
    if not changed:
        git(root, "checkout", "--", "params.yaml")  # leave the work tree as it was
        return Completed(message=f"no-op: data, config and code unchanged; {stays}")
    logger.info("changed: %s", ", ".join(changed))
    frozen = cfg.data.frozen_test
    if current is None and frozen and not (Path(root) / frozen).exists():
        freeze_task(root, overrides)  # the first promotion is judged on the set later runs reuse
    failed = run_stages(root)
    if isinstance(failed, State):
        return failed
    verdict, reasons = read_verdict(Path(root) / cfg.paths.report / "metrics.json")
    sha = commit_task(root, cfg, f"Retraining run: quality gate {verdict}")
    resource = {"prefect.resource.id": f"qlora-pipeline.run.{sha}", "commit": sha}
    if verdict != "PASS":
        emit_event(
            event="qlora-pipeline.gate.failed", resource=resource, payload={"reasons": reasons}
        )
        return Failed(message=f"quality gate FAIL: {'; '.join(reasons)}; {stays}")
    with transaction() as txn:
        txn.set("root", root)
        version = promote_task(root, sha, cfg.promotion)
        push_task(root, cfg.promotion)
    emit_event(event="qlora-pipeline.promoted", resource=resource, payload={"version": version})
    return Completed(message=f"promoted {registry.ARTIFACT} {version} (before: {in_prod})")


GATE_FAILED = 3


def failure(state: State) -> int:
    """A failed run's one line and exit code: 2 when a stage stopped on bad input, else 1."""
    if state.name == BAD_INPUT:
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    print(f"error: pipeline failed: {state.message}", file=sys.stderr)
    return 1


def run(root: Path, overrides: list[str], cfg: PipelineConfig) -> int:
    """Entry point of `qlora-pipeline run`, once `checks.prelaunch` checked the overrides (`cfg`).

    Returns 0, 1 when a stage failed, or 3 when the quality gate says FAIL and
    `report.gate.enforce` is on (the report is written either way).
    """
    with exclusive(root, "qlora-pipeline run"):
        api.ready()
        state = pipeline_flow(str(root), list(overrides), return_state=True)
    if state.is_failed():
        return failure(state)
    verdict, reasons = read_verdict(root / cfg.paths.report / "metrics.json")
    if verdict != "PASS" and cfg.report.gate.enforce:
        print(f"error: quality gate FAIL: {'; '.join(reasons)}", file=sys.stderr)
        return GATE_FAILED
    return 0


def retrain(root: Path, overrides: list[str], cfg: PipelineConfig) -> int:
    """Entry point of `qlora-pipeline retrain`: refuse a dirty work tree or the wrong branch,
    then run the retraining flow.

    Returns 0 (promoted, or nothing changed), 3 (the gate said FAIL: the run is committed, prod
    is untouched) or 1 (a stage, the commit or the push failed; a promotion is taken back).
    """
    with exclusive(root, "qlora-pipeline retrain"):
        check_work_tree(root, cfg)  # fail fast, before Prefect's flow
        api.ready()
        state = retrain_flow(str(root), list(overrides), return_state=True)
    if state.is_completed():
        print(state.message)
        return 0
    if (state.message or "").startswith("quality gate FAIL"):
        print(state.message, file=sys.stderr)
        return GATE_FAILED
    return failure(state)
