"""Conversation -> text segments, each marked as response (trained on by default) or context.

`auto` uses the tokenizer's chat template when it has one, else the built-in `qa` template. Built-in
templates put the tokenizer's BOS in front and its EOS after every response, as text the tokenizer
maps to the special ids. The evaluation prompt is everything before the last response.
"""

from __future__ import annotations

from typing import Any

from qlora_pipeline.data.formats import Conversation
from qlora_pipeline.errors import PipelineError

Segment = tuple[str, bool]  # (text, is_response)

BUILTIN = {
    "qa": {
        "system": "{content}\n",
        "user": "Q: {content}\nA:",
        "assistant": " {content}\n{eos}",
    },
    "alpaca": {
        "system": "{content}\n\n",
        "user": "### Instruction:\n{content}\n\n### Response:\n",
        "assistant": "{content}{eos}\n\n",
    },
    "chatml": {
        "system": "<|im_start|>system\n{content}<|im_end|>\n",
        "user": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        "assistant": "{content}<|im_end|>{eos}\n",
    },
}
TEMPLATES = ("auto", "chat_template", *BUILTIN)


def resolve(template: str, tokenizer: Any) -> str:
    """The template actually used: `auto` picks the tokenizer's chat template when it has one."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat_template" if has_chat else "qa"
    if template == "chat_template" and not has_chat:
        raise PipelineError(
            "config key 'data.template': the tokenizer has no chat template; "
            f"use auto or one of {', '.join(BUILTIN)}"
        )
    if template not in TEMPLATES:
        raise PipelineError(
            f"config key 'data.template': got {template!r}, expected one of {', '.join(TEMPLATES)}"
        )
    return template


def _builtin(conversation: Conversation, name: str, bos: str, eos: str) -> list[Segment]:
    parts = BUILTIN[name]
    segments = [
        (parts[role].format(content=content, eos=eos), role == "assistant")
        for role, content in conversation
    ]
    text, is_response = segments[0]
    return [(bos + text, is_response), *segments[1:]]


def _chat_template(conversation: Conversation, tokenizer: Any, eos: str) -> list[Segment]:
    messages = [{"role": role, "content": content} for role, content in conversation]
    segments: list[Segment] = []
    done = ""  # the template's own text so far: without the EOS added after each response
    for i, (role, _) in enumerate(conversation):
        if role != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise PipelineError(
                "the tokenizer's chat template does not render turns as prefixes of the whole "
                "conversation; set data.template to a built-in one (qa, alpaca, chatml)"
            )
        response = full[len(prompt) :]
        if eos and eos not in response:  # end-of-turn is not EOS (Llama 3, Qwen2.5 base): the
            response += eos  # model must learn to stop, so EOS follows every response
        segments += [(prompt[len(done) :], False), (response, True)]
        done = full
    return segments


def render(conversation: Conversation, template: str, tokenizer: Any) -> list[Segment]:
    """Text segments of one conversation with a resolved template (see `resolve`).

    Raw text (one "text" message) is BOS + text + EOS, all of it trained on.
    """
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if conversation[0][0] == "text":
        return [(bos + conversation[0][1] + eos, True)]
    if template == "chat_template":
        return _chat_template(conversation, tokenizer, eos)
    return _builtin(conversation, template, bos, eos)


def eval_prompt(segments: list[Segment]) -> str:
    """The text a model is given at evaluation: everything before the last response."""
    last = max(i for i, (_, is_response) in enumerate(segments) if is_response)
    return "".join(text for text, _ in segments[:last])
