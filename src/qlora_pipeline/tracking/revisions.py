"""Hub models and datasets pinned to a commit: params.yaml (and so dvc.lock) never records a
moving name such as `main`, which would let the same lock describe different weights or data."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_pipeline.config.schema import PipelineConfig
from qlora_pipeline.errors import ConfigError

SHA = re.compile(r"^[0-9a-f]{40}$")


def hub_refs(cfg: PipelineConfig) -> list[tuple[str, str, str, str]]:
    """(config key, repo type, repo id, revision) of every hub repository the config reads.

    A local folder is not a hub repository: its content is what DVC hashes.
    """
    out = []
    m, d = cfg.model, cfg.data
    if m.source == "pretrained" and m.path and not Path(m.path).exists():
        out.append(("model.revision", "model", m.path, m.revision or "main"))
    if d.source == "hub" and d.path and not Path(d.path).exists():
        out.append(("data.revision", "dataset", d.path, d.revision or "main"))
    return out


def cached_sha(repo_type: str, repo_id: str, revision: str) -> str | None:
    """The commit a revision pointed to when it was last downloaded (the HF cache's refs/)."""
    from huggingface_hub import constants

    ref = (
        Path(constants.HF_HUB_CACHE)
        / f"{repo_type}s--{repo_id.replace('/', '--')}"
        / "refs"
        / revision
    )
    if ref.is_file():
        sha = ref.read_text(encoding="utf-8").strip()
        return sha if SHA.match(sha) else None
    return None


def resolve(repo_type: str, repo_id: str, revision: str) -> str | None:
    """The commit SHA `revision` names now: asked of the hub, else read from the local cache."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=10)
            if info.sha:
                return str(info.sha)
        except Exception:  # offline, unknown, gated: fall back to the cache
            pass
    return cached_sha(repo_type, repo_id, revision)


def pinning_overrides(cfg: PipelineConfig) -> list[str]:
    """Hydra overrides that replace every moving hub revision with its commit SHA.

    Raises:
        ConfigError: a revision that is neither a SHA nor resolvable (offline, not cached).
    """
    overrides = []
    for key, repo_type, repo_id, revision in hub_refs(cfg):
        if SHA.match(revision):
            continue
        sha = resolve(repo_type, repo_id, revision)
        if sha is None:
            raise ConfigError(
                f"config key '{key}': cannot pin {repo_type} '{repo_id}' at '{revision}' to a "
                "commit (the hub is not reachable and the local cache has no such ref); connect "
                f"once, or set {key}=<40-hex commit SHA>"
            )
        overrides.append(f"{key}={sha}")
    return overrides


def require_pinned(cfg: PipelineConfig) -> None:
    """Stages refuse a moving revision (e.g. params.yaml composed by `dvc exp run`).

    Raises:
        ConfigError: naming the key and the fix.
    """
    for key, repo_type, repo_id, revision in hub_refs(cfg):
        if not SHA.match(revision):
            raise ConfigError(
                f"config key '{key}': {repo_type} '{repo_id}' at '{revision}' is a moving name; "
                f"compose with `qlora-pipeline compose` (pins it to a commit) or set {key}=<SHA>"
            )
