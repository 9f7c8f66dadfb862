"""How the flow walks dvc.yaml's DAG: which stages may run, and when each is submitted as a
Prefect task run (real task runs on Prefect's test server; the tasks only sleep)."""

from __future__ import annotations

import threading
import time

from prefect import flow, task

from pipelines.flow import run_graph, stale_stages

# bootstrap and prepare feed two independent arms; the report needs both
ORDER = [
    ("bootstrap", []),
    ("prepare", []),
    ("train-a", ["bootstrap", "prepare"]),
    ("train-b", ["bootstrap", "prepare"]),
    ("note", ["bootstrap"]),
    ("report", ["train-a", "train-b"]),
]


def test_stale_stages_are_the_changed_ones_and_everything_downstream_of_them():
    assert stale_stages(ORDER, {"prepare"}) == {"prepare", "train-a", "train-b", "report"}
    assert stale_stages(ORDER, {"train-b"}) == {"train-b", "report"}
    assert stale_stages(ORDER, set()) == set()


def _walk(slots: int, heavy: set[str], fail: str | None = None) -> tuple[list, str | None]:
    """Run ORDER through run_graph in a flow; each task logs (event, name, time, running)."""
    events: list[tuple[str, str, float, int]] = []
    lock = threading.Lock()
    running: set[str] = set()

    @task
    def stage(name: str) -> str:
        with lock:
            running.add(name)
            events.append(("start", name, time.monotonic(), len(heavy & running)))
        time.sleep(0.3)  # long enough that two stages started together overlap on a busy CI
        with lock:
            running.discard(name)
            events.append(("end", name, time.monotonic(), len(heavy & running)))
        if name == fail:
            raise RuntimeError(f"{name} failed")
        return name

    @flow
    def walk() -> str | None:
        failed = run_graph(
            ORDER,
            lambda name, upstream: stage.submit(name, wait_for=upstream),
            slots,
            heavy,
        )
        return None if failed is None else failed.message

    return events, walk()


def _starts(events: list) -> dict[str, float]:
    return {name: t for kind, name, t, _ in events if kind == "start"}


def _ends(events: list) -> dict[str, float]:
    return {name: t for kind, name, t, _ in events if kind == "end"}


def test_at_most_slots_heavy_stages_run_at_once_in_dependency_order():
    heavy = {"bootstrap", "prepare", "train-a", "train-b", "report"}
    events, failed = _walk(1, heavy)
    assert failed is None
    starts, ends = _starts(events), _ends(events)
    assert max(n for kind, _, _, n in events if kind == "start") == 1  # never two at once
    for name, upstream in ORDER:
        assert all(ends[u] <= starts[name] for u in upstream), name
    heavy_order = sorted((n for n in starts if n in heavy), key=starts.__getitem__)
    assert heavy_order == ["bootstrap", "prepare", "train-a", "train-b", "report"]
    # a light stage does not wait for a slot: `note` runs while a heavy stage does (submitted
    # together with `prepare`, either may start first; with a slot of its own they can't overlap)
    assert any(starts[h] < ends["note"] and starts["note"] < ends[h] for h in heavy)


def test_two_slots_run_independent_heavy_stages_side_by_side():
    heavy = {"train-a", "train-b"}
    events, failed = _walk(2, heavy)
    assert failed is None
    starts, ends = _starts(events), _ends(events)
    assert starts["train-b"] < ends["train-a"] and starts["train-a"] < ends["train-b"]


def test_after_a_failure_nothing_more_is_submitted():
    events, failed = _walk(1, {"bootstrap", "prepare", "train-a", "train-b"}, fail="train-a")
    assert failed is not None and "train-a failed" in failed
    starts = _starts(events)
    assert "report" not in starts and "train-b" not in starts  # train-b waited for the slot
