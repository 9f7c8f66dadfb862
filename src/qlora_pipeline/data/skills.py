"""The skills of the synthetic task. Each skill maps a random argument string to an answer.

Pre-training states them in prose (`k d a backwards is a d k .`); fine-tuning teaches the unseen
instruction format (`Q: reverse k d a` / `A: a d k`). Letters and digits are space-separated so that
each is one byte-level BPE token.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

MAX_ADDEND = 10


def _spaced(chars: str) -> str:
    return " ".join(chars)


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


@dataclass(frozen=True)
class Skill:
    """A skill: how to draw arguments, the answer, and how pre-training phrases it."""

    instruction: Callable[[str], str]
    answer: Callable[[str], str]
    prose: Callable[[str, str], str]
    draw: Callable[[random.Random, int], str]


def _draw_letters(rng: random.Random, n: int) -> str:
    return _spaced(_letters(rng, n))


def _draw_sum(rng: random.Random, n: int) -> str:
    del n  # sums draw two numbers below MAX_ADDEND whatever the string length
    a, b = rng.randrange(MAX_ADDEND), rng.randrange(MAX_ADDEND)
    return f"{_spaced(str(a))} plus {_spaced(str(b))}"


def _sum_answer(args: str) -> str:
    a, b = args.split(" plus ")
    return _spaced(str(int(a.replace(" ", "")) + int(b.replace(" ", ""))))


SKILLS: dict[str, Skill] = {
    "reverse": Skill(
        instruction=lambda a: f"reverse {a}",
        answer=lambda a: " ".join(reversed(a.split())),
        prose=lambda a, r: f"{a} backwards is {r} .",
        draw=_draw_letters,
    ),
    "upper": Skill(
        instruction=lambda a: f"upper {a}",
        answer=lambda a: a.upper(),
        prose=lambda a, r: f"{a} in caps is {r} .",
        draw=_draw_letters,
    ),
    "sort": Skill(
        instruction=lambda a: f"sort {a}",
        answer=lambda a: " ".join(sorted(a.split())),
        prose=lambda a, r: f"{a} in order is {r} .",
        draw=_draw_letters,
    ),
    "add": Skill(
        instruction=lambda a: f"add {a.replace(' plus ', ' and ')}",
        answer=_sum_answer,
        prose=lambda a, r: f"{a} is {r} .",
        draw=_draw_sum,
    ),
}


def example(skill: str, rng: random.Random, length: int) -> tuple[str, str]:
    """Draw one (instruction, answer) pair of `skill`."""
    s = SKILLS[skill]
    args = s.draw(rng, length)
    return s.instruction(args), s.answer(args)


def prose_line(skill: str, rng: random.Random, length: int) -> str:
    """Draw one pre-training sentence stating `skill` on fresh arguments."""
    s = SKILLS[skill]
    args = s.draw(rng, length)
    return s.prose(args, s.answer(args))
