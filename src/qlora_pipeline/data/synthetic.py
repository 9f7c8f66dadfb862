"""The generated instruction task: balanced over skills, test and val prompts never seen in train."""

from __future__ import annotations

import random

from qlora_pipeline.config.schema import SyntheticConfig
from qlora_pipeline.data.skills import example

Record = dict[str, str]


def _unique(
    skills: list[str], n: int, rng: random.Random, length: int, taken: set[str]
) -> list[Record]:
    out: list[Record] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct held-out prompts; lower n_val/n_test")
        instruction, answer = example(skills[len(out) % len(skills)], rng, length)
        if instruction not in taken:
            taken.add(instruction)
            out.append({"instruction": instruction, "output": answer})
    return out


def generate(cfg: SyntheticConfig, seed: int) -> dict[str, list[Record]]:
    """Draw train/val/test records, round-robin over the skills, from `seed`.

    Held-out prompts (val, test) are distinct and never appear in train; train may repeat itself.
    """
    rng = random.Random(seed)
    held_out: set[str] = set()
    test = _unique(cfg.skills, cfg.n_test, rng, cfg.string_length, held_out)
    val = _unique(cfg.skills, cfg.n_val, rng, cfg.string_length, held_out)
    train: list[Record] = []
    misses = 0
    while len(train) < cfg.n_train:
        skill = cfg.skills[len(train) % len(cfg.skills)]
        instruction, answer = example(skill, rng, cfg.string_length)
        if instruction in held_out:
            misses += 1
            if misses > 100_000:
                raise ValueError(
                    f"skill '{skill}': held-out prompts leave none to train on; lower n_val/n_test"
                )
            continue
        train.append({"instruction": instruction, "output": answer})
    rng.shuffle(train)
    return {"train": train, "val": val, "test": test}
