"""The frozen evaluation set: the test split pinned once, reused by every later run.

Scheduled retraining compares each new adapter with the promoted one item by item, which needs the
same test items every time. The first retraining run freezes the test split it would cut or read
(`freeze`): its conversations go to `data.frozen_test` (default `data/frozen/test.jsonl`), tracked
by DVC (`dvc add`, pushed with every promotion). From then on `prepare` takes the test split from
that file, whatever the data says, and new data only grows train and val: rows equal to a frozen
test item are dropped from them, and the usual n-gram contamination check runs against it.
Replacing it (`qlora-pipeline freeze-test --reset`) is a recorded decision: a commit of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.data import sources
from qlora_pipeline.data.formats import Conversation
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.files import atomic_write_text


def to_jsonl(conversations: list[Conversation]) -> str:
    """One `{"messages": [{"role", "content"}, ...]}` line per conversation."""
    return "".join(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in x]}, ensure_ascii=False)
        + "\n"
        for x in conversations
    )


def read(path: str | Path) -> tuple[list[Conversation], dict]:
    """The frozen conversations, and the file's path, sha256 and row count.

    Raises:
        PipelineError: one line naming the file and row of a malformed record.
    """
    rows = sources.read_file(path)
    out = []
    for row, where in zip(rows.rows, rows.where, strict=True):
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PipelineError(
                f'{where}: a frozen test item must be {{"messages": [{{"role", "content"}}, ...]}}'
            )
        out.append([(m["role"], m["content"]) for m in messages])
    return out, rows.sources[0]


def write(path: str | Path, conversations: list[Conversation]) -> Path:
    if not conversations:
        raise PipelineError(f"{path}: no test items to freeze")
    return atomic_write_text(path, to_jsonl(conversations))
