"""Cleaning and checks on conversations: duplicates (exact and normalized text) and n-gram
contamination of evaluation examples by the training set."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

from qlora_pipeline.data.formats import Conversation

_WORD = re.compile(r"\w+")


def exact_key(conversation: Conversation) -> str:
    return "\x1e".join(f"{role}\x1f{content}" for role, content in conversation)


def words(text: str) -> list[str]:
    """Unicode-normalized, case-folded word tokens: punctuation and spacing don't count."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalized_key(conversation: Conversation) -> str:
    return "\x1e".join(f"{role}\x1f{' '.join(words(content))}" for role, content in conversation)


def dedupe(
    conversations: Sequence[Conversation], drop: bool = True
) -> tuple[list[int], dict[str, int]]:
    """Indices to keep (first occurrence wins) and how many exact / normalized duplicates there are.

    With `drop=False` every index is kept and the duplicates are only counted.
    """
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    keep: list[int] = []
    counts = {"exact_duplicates": 0, "normalized_duplicates": 0}
    for i, conversation in enumerate(conversations):
        exact, norm = exact_key(conversation), normalized_key(conversation)
        if exact in seen_exact:
            counts["exact_duplicates"] += 1
        elif norm in seen_norm:
            counts["normalized_duplicates"] += 1
        else:
            seen_exact.add(exact)
            seen_norm.add(norm)
            keep.append(i)
            continue
        if not drop:
            keep.append(i)
    return keep, counts


def ngrams(conversation: Conversation, n: int) -> Iterator[tuple[str, ...]]:
    """Word n-grams of a whole example; a shorter example is one gram of all its words."""
    tokens = words(" ".join(content for _, content in conversation))
    if len(tokens) <= n:
        if tokens:
            yield tuple(tokens)
        return
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i : i + n])


def contamination(
    train: Iterable[Conversation], held_out: Sequence[Conversation], n: int, threshold: float
) -> tuple[list[float], list[bool]]:
    """Per held-out example: the fraction of its n-grams found in the training set, and whether
    that fraction reaches `threshold` (contaminated). Only held-out n-grams are kept in memory."""
    held = [set(ngrams(conversation, n)) for conversation in held_out]
    wanted = set().union(*held)
    found: set[tuple[str, ...]] = set()
    for conversation in train:
        found.update(g for g in ngrams(conversation, n) if g in wanted)
    overlaps = [len(grams & found) / len(grams) if grams else 0.0 for grams in held]
    return overlaps, [o >= threshold for o in overlaps]
