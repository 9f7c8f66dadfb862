"""The model registry: GTO (git tags) over the artifact declared in dvc.yaml.

A promotion registers the commit that holds a run (its `dvc.lock`, `reports/` and `runs/`) as a new
version of the shipped QLoRA adapter (`qlora-adapter@vX.Y.Z`) and assigns it the `prod` stage
(`qlora-adapter#prod#N`). The tags are the registry: `gto show`, `dvc artifacts get` and every git
host read them, and the commit they point at carries the gate evidence (metrics.json with scores,
intervals and noise floor; items.csv with per-item correctness), the data and config hashes
(dvc.lock) and the environment fingerprint (runs/). Only a committed run whose gate says PASS is
promoted; a rollback assigns `prod` to an earlier version, recorded like a promotion.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.reporting.figures import shipped_qlora

ARTIFACT = "qlora-adapter"  # dvc.yaml `artifacts:`: the first seed's QLoRA adapter
STAGE = "prod"
METRICS = "reports/metrics.json"
PROMOTED = "promoted"  # report.accepted_rev: the version in prod, pinned to its tag at compose time


def git(root: str | Path, *args: str) -> str:
    """A git command in `root`; its output.

    Raises:
        PipelineError: git failed (its message, in one line).
    """
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def committed_metrics(root: Path, rev: str) -> dict[str, Any]:
    """`reports/metrics.json` as committed at `rev`.

    Raises:
        PipelineError: no report committed there.
    """
    from qlora_pipeline.reporting.history import accepted_metrics

    found, _ = accepted_metrics(rev, root / METRICS)
    if found is None:
        raise PipelineError(f"{METRICS}: not committed at {rev}; commit the run's reports first")
    return found


def evidence(metrics: dict[str, Any]) -> str:
    """One line of gate evidence per task: the pooled gap [interval], the noise floor, what
    ships; the tag message of a version."""
    lines = [f"gate {metrics['verdict']}"]
    for task, t in metrics["tasks"].items():
        floor = t.get("noise_floor")
        lines.append(
            f"{task}: QLoRA {shipped_qlora(t)['value']:.3f} shipped; QLoRA − LoRA {t['gap']:+.3f} "
            f"[{t['gap_ci_low']:+.3f}, {t['gap_ci_high']:+.3f}] pooled; noise floor "
            + ("n/a" if floor is None else f"{floor:.3f}")
        )
    return "\n".join(lines)


def require_clean(root: Path) -> None:
    """Refuse to act on a work tree with uncommitted changes: a promotion names a commit, and the
    registry must never point at a commit that does not hold what was evaluated."""
    dirty = git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        first = dirty.splitlines()[0].strip()
        raise PipelineError(
            f"the work tree has uncommitted changes ({first}, ...); commit the run (dvc.lock, "
            "reports/, runs/) or stash them first"
        )


def promote(
    root: Path,
    rev: str = "HEAD",
    message: str = "",
    author: tuple[str, str] | None = None,
) -> str:
    """Register `rev` as a new version of the adapter and assign it `prod`, if its committed
    report's gate says PASS. Returns the new version.

    Raises:
        PipelineError: a dirty work tree, no committed report, or a gate that did not pass
            (nothing is tagged).

    `author` (name, email) signs the tags; by default git's configured identity.
    """
    from gto import api

    require_clean(root)
    metrics = committed_metrics(root, rev)
    if metrics.get("verdict") != "PASS":
        raise PipelineError(
            f"not promoted: the quality gate at {rev} says {metrics.get('verdict')} "
            f"({'; '.join(metrics.get('reasons', []))})"
        )
    commit = git(root, "rev-parse", rev)
    current = current_version(root)
    if current is not None and current["commit"] == commit:
        raise PipelineError(f"{rev} ({commit[:7]}) is already in {STAGE} as {current['version']}")
    text = evidence(metrics) + (f"\n{message}" if message else "")
    name, email = author or (None, None)
    registered = api.register(root, ARTIFACT, commit, message=text, author=name, author_email=email)
    version = str(registered.version)
    api.assign(
        root,
        ARTIFACT,
        STAGE,
        version=version,
        message="promote: gate PASS",
        author=name,
        author_email=email,
    )
    return version


def unpromote(root: Path, version: str) -> None:
    """Take back a promotion: delete the version's registration tag and the assignments that
    name it (a failed push must not leave a version in prod that is not shared)."""
    for event in _events(root):
        if event["version"] == version and event["event"] in ("registration", "assignment"):
            git(root, "tag", "-d", event["ref"])


def _events(root: Path) -> list[dict[str, Any]]:
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        return list(api.history(root, ARTIFACT))
    except ArtifactNotFound:
        return []


def current_version(root: Path) -> dict[str, Any] | None:
    """The version in `prod`: the one its latest assignment names, {version, commit, tag, author,
    created_at}, or None. Latest by the assignment counter (`#prod#N`), which GTO increments:
    tag times have one-second resolution and tie."""
    assignments = [e for e in _events(root) if e["event"] == "assignment" and e["stage"] == STAGE]
    if not assignments:
        return None
    last = max(assignments, key=lambda e: int(e["ref"].rsplit("#", 1)[1]))
    return {
        "version": last["version"],
        "commit": last["commit"],
        "tag": last["ref"],
        "author": last["author"],
        "created_at": last["timestamp"].isoformat(),
    }


def _registrations(root: Path) -> list[dict[str, Any]]:
    """GTO's registration events, in version order."""
    return sorted(
        (event for event in _events(root) if event["event"] == "registration"),
        key=lambda event: tuple(int(x) for x in event["version"].lstrip("v").split(".")),
    )


def versions(root: Path) -> list[dict[str, Any]]:
    """Every registered version, in version order, with its commit and gate evidence."""
    return [
        {
            "version": event["version"],
            "commit": event["commit"],
            "created_at": event["timestamp"].isoformat(),
            "metrics": committed_metrics(root, event["commit"]),
        }
        for event in _registrations(root)
    ]


def rollback(root: Path, to: str | None = None) -> str:
    """Assign `prod` to `to`, or to the version registered before the current one. Recorded as
    an assignment, like a promotion. Returns the version now in `prod`.

    Raises:
        PipelineError: nothing in prod, no earlier version, or an unknown version.
    """
    from gto import api

    current = current_version(root)
    if current is None:
        raise PipelineError(f"nothing is in {STAGE}: there is nothing to roll back")
    known = [event["version"] for event in _registrations(root)]
    if to is None:
        earlier = known[: known.index(current["version"])]
        if not earlier:
            raise PipelineError(f"{current['version']} is the first version: no earlier one")
        to = earlier[-1]
    if to not in known:
        raise PipelineError(f"unknown version {to}; registered: {', '.join(known)}")
    api.assign(
        root, ARTIFACT, STAGE, version=to, message=f"rollback from {current['version']}", force=True
    )
    return to


def version_ref(version: str) -> str:
    """A version's registration tag: a git revision that never moves."""
    return f"{ARTIFACT}@{version}"


def is_registry_ref(rev: str | None) -> bool:
    return rev is not None and (rev == PROMOTED or rev.startswith(f"{ARTIFACT}@"))


def promoted_ref(root: Path) -> str | None:
    """The registration tag of the version in prod, or None (nothing promoted)."""
    current = current_version(root)
    return None if current is None else version_ref(current["version"])


def first_ref_under(root: Path, protocol: dict[str, Any], test_set: str) -> str | None:
    """The first registered version evaluated under `protocol` on the evaluation set `test_set`:
    the anchor of slow drift (a reset of the evaluation set starts a new one)."""
    for v in versions(root):
        if v["metrics"].get("protocol") == protocol and v["metrics"].get("test_set") == test_set:
            return version_ref(v["version"])
    return None


def pinning_override(accepted_rev: str | None, root: Path) -> list[str]:
    """`report.accepted_rev=promoted` as the tag of the version in prod, so params.yaml (and the
    report stage's params in dvc.lock) changes with every promotion or rollback, and a cached
    report can never compare with the version that was in prod before."""
    if accepted_rev != PROMOTED or not (root / ".git").exists():
        return []
    ref = promoted_ref(root)
    return [] if ref is None else [f"report.accepted_rev='{ref}'"]
