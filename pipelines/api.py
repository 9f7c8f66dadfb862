"""The Prefect API a command's flow runs talk to: the server PREFECT_API_URL names when it is set
(yours), otherwise a temporary one this command starts (`prefect server start`, its SQLite
database under PREFECT_HOME) and stops.

Prefect starts a temporary server by itself when no API is set, but only at the flow's first
call, after importing its whole server application into the command (~3 s of CPU), and its exit
handler stops it while the server may still be writing the run's last task-run states (a
`task_run_recorder` "Error flushing 1 events" traceback). Here it starts first thing (`start`),
booting in its own process while the command imports the flow and checks the config; `ready`
waits for it before the flow and sets what its flow runs need (`TEMPORARY_SETTINGS`); `stop`
hands it the command's pending events and lets it record them before it ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError

LOG_NAME = "temporary-server.log"  # under PREFECT_HOME: what the server said
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's own setting
_SERVER: dict[str, Any] = {}  # the one this process started: proc, url, log, since, ready, settings
# Prefect settings for the flow runs on a temporary server. No flow-run heartbeats: they let a
# server tell that a run crashed, and this one ends with the command. A flow run waited for its
# heartbeat thread's 1 s sleep to end, up to 1 s a run (benchmarks/bench_run_end.py).
TEMPORARY_SETTINGS: dict[str, Any] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": None}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> None:
    """Start a temporary server unless PREFECT_API_URL names one; point PREFECT_API_URL at it.
    Prefect reads the setting once, when imported: imported already, it is left to Prefect."""
    if os.environ.get("PREFECT_API_URL") or _SERVER or "prefect" in sys.modules:
        return
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = home / LOG_NAME
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--no-ui", "--analytics-off", "--no-scheduler"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_UI_URL"] = ""  # no "View at <link>": no UI, and gone after the command
    since = datetime.now(timezone.utc)
    _SERVER.update(proc=proc, url=url, log=log, since=since, ready=False, settings=ExitStack())


def ready() -> None:
    """Wait until the server `start` started answers (its database migrated), then apply
    `TEMPORARY_SETTINGS` until `stop`.

    Raises:
        PipelineError: it exited, or did not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_
            TIMEOUT_SECONDS; the line names its log.
    """
    if not _SERVER or _SERVER["ready"]:
        return
    _answering(_SERVER["proc"], _SERVER["url"], _SERVER["log"])
    import prefect.settings
    from prefect.settings import temporary_settings

    named = {getattr(prefect.settings, k): v for k, v in TEMPORARY_SETTINGS.items()}
    _SERVER["settings"].enter_context(temporary_settings(named))
    _SERVER["ready"] = True
    _release_stale_slots()


def _release_stale_slots() -> None:
    """Free every slot the database records as held. The server is this command's and no flow
    has run on it yet, so those are a killed command's (SIGKILL, the OOM killer): their leases
    lived in that command's server's memory and died with it, nothing would release them, and
    the next run's first stage would wait for a slot for ever."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=200):
            if limit.active_slots:
                freed = GlobalConcurrencyLimitUpdate(active_slots=0)
                client.update_global_concurrency_limit(limit.name, freed)
                print(
                    f"note: freed {limit.active_slots} slot(s) of the concurrency limit "
                    f"'{limit.name}' that a killed run held",
                    file=sys.stderr,
                )


def _answering(proc: subprocess.Popen, url: str, log: Path) -> None:
    limit = os.environ.get(TIMEOUT_ENV, "90")
    deadline = time.monotonic() + float(limit)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PipelineError(
                f"the temporary Prefect server exited with {proc.returncode} before it answered; "
                f"its output: {log}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise PipelineError(
        f"the temporary Prefect server did not answer within {limit} s ({TIMEOUT_ENV}); "
        f"its output: {log}"
    )


def _unrecorded(since: datetime) -> int:
    """Task runs of the flow runs started since `since` that the server has not yet recorded
    as finished (their states reach it as events, written by its task-run recorder)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    final = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
    unfinished = [t for t in StateType if t not in final]
    after: Any = since  # pydantic takes a datetime for Prefect's DateTime
    with get_client(sync_client=True) as client:
        return len(
            client.read_task_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))
                ),
            )
        )


def stop(settle_s: float = 10.0) -> None:
    """Stop the server `start` started: first send it this process' pending events and wait
    (at most `settle_s`) until it has recorded every task run as finished, then end it."""
    if not _SERVER:
        return
    proc = _SERVER["proc"]
    try:
        if _SERVER["ready"] and proc.poll() is None and "prefect" in sys.modules:
            from prefect.events.worker import EventsWorker

            EventsWorker.drain_all(timeout=settle_s)
            deadline = time.monotonic() + settle_s
            while _unrecorded(_SERVER["since"]) and time.monotonic() < deadline:
                time.sleep(0.05)
    except Exception as e:  # settling is a courtesy to the server's records, never a failure
        print(f"note: the temporary Prefect server did not settle: {e}", file=sys.stderr)
    finally:
        proc.terminate()  # uvicorn ends gracefully, after its start-up if still booting
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for name in ("PREFECT_API_URL", "PREFECT_UI_URL"):
            os.environ.pop(name, None)
        _SERVER["settings"].close()
        _SERVER.clear()
