"""Record formats -> one canonical shape: a conversation, a list of (role, content) messages.

alpaca (instruction / input / output), chat (a list of role / content messages; ShareGPT's
from / value through `message_keys` and `roles`), prompt / completion, and raw text (one message
with role "text", for continued pre-training). `columns` maps a canonical field to the source's
column name for any other naming.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlora_pipeline.errors import PipelineError

Message = tuple[str, str]
Conversation = list[Message]

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
FIELDS = {  # canonical field -> required?
    "alpaca": {"instruction": True, "input": False, "output": True, "system": False},
    "chat": {"messages": True},
    "prompt_completion": {"prompt": True, "completion": True},
    "text": {"text": True},
}
ROLES = ("system", "user", "assistant")


def _field(
    row: Mapping[str, Any], where: str, fmt: str, name: str, columns: Mapping[str, str]
) -> Any:
    column = columns.get(name, name)
    if column not in row:
        if not FIELDS[fmt][name]:
            return None
        mapped = f" (mapped from '{name}' by data.columns)" if column != name else ""
        raise PipelineError(
            f"{where}: missing column '{column}'{mapped} for format '{fmt}'; "
            f"the row has columns {sorted(map(str, row))}"
        )
    return row[column]


def _text(value: Any, where: str, column: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise PipelineError(
            f"{where}: column '{column}' must be a string, got {type(value).__name__} {value!r:.40}"
        )
    return value


def _chat(
    value: Any,
    where: str,
    column: str,
    message_keys: Mapping[str, str],
    roles: Mapping[str, str],
) -> Conversation:
    if not isinstance(value, list) or not value:
        raise PipelineError(
            f"{where}: column '{column}' must be a non-empty list of messages, "
            f"got {type(value).__name__}"
        )
    role_key, content_key = message_keys.get("role", "role"), message_keys.get("content", "content")
    out: Conversation = []
    for i, message in enumerate(value):
        at = f"{where}: {column}[{i}]"
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise PipelineError(
                f"{at}: expected an object with '{role_key}' and '{content_key}', got {message!r:.60}"
            )
        raw_role = message[role_key]
        role = roles.get(raw_role, raw_role) if isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            raise PipelineError(
                f"{at}: unknown role {raw_role!r}; expected one of {', '.join(ROLES)} "
                "(map others with data.roles, e.g. {human: user, gpt: assistant})"
            )
        out.append((role, _text(message[content_key], at, content_key)))
    if out[-1][0] != "assistant":
        raise PipelineError(
            f"{where}: the last message must be the assistant's, got '{out[-1][0]}'"
        )
    return out


def to_conversation(
    row: Mapping[str, Any],
    where: str,
    fmt: str,
    columns: Mapping[str, str] | None = None,
    message_keys: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
) -> Conversation:
    """One raw row as a conversation; the last message is the response trained on and evaluated.

    Raises:
        PipelineError: a missing column (naming the columns that exist) or a wrong type, at `where`.
    """
    columns = columns or {}
    if fmt not in FIELDS:
        raise PipelineError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")

    def get(name: str) -> Any:
        return _field(row, where, fmt, name, columns)

    def col(name: str) -> str:
        return columns.get(name, name)

    if fmt == "alpaca":
        instruction = _text(get("instruction"), where, col("instruction"))
        extra = _text(get("input"), where, col("input"), optional=True)
        system = _text(get("system"), where, col("system"), optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        conversation = [("system", system)] if system.strip() else []
        return [
            *conversation,
            ("user", user),
            ("assistant", _text(get("output"), where, col("output"))),
        ]
    if fmt == "prompt_completion":
        return [
            ("user", _text(get("prompt"), where, col("prompt"))),
            ("assistant", _text(get("completion"), where, col("completion"))),
        ]
    if fmt == "text":
        return [("text", _text(get("text"), where, col("text")))]
    return _chat(get("messages"), where, col("messages"), message_keys or {}, roles or {})


def is_empty(conversation: Conversation) -> bool:
    """True when the response, or everything before it, is empty or whitespace only."""
    *context, (role, response) = conversation
    if not response.strip():
        return True
    return role != "text" and not any(content.strip() for _, content in context)
