"""A fork server for stage commands: the heavy libraries imported once per flow run, not per stage.

Every stage is its own process (DVC runs `qlora-pipeline <stage>`), and each used to import torch,
transformers, peft, bitsandbytes and lm-eval anew: 7-10 s a stage on 2 cores, over a minute of a
14-stage run. The flow now starts one server (`serving`), which pins the CPU kernels, imports those
libraries and computes nothing. DVC still runs every stage command, so hashing, skipping, the run
cache and dvc.lock stay DVC's. The command (`delegate`, first thing in `cli.main`) hands its
arguments, working folder, environment and stdin/stdout/stderr to the server, which forks a child
that runs the command with them and sends back its exit status:

    flow -> dvc repro -> qlora-pipeline train qlora --seed 0 -> server: fork -> child runs `train`

`dvc repro` itself runs in a child of the server too (`dvc`): DVC is imported there, where a `dvc`
process spent ~0.4 s a stage starting. Each child is a process of its own, so DVC's repository
lock works between two stages side by side as between two `dvc` processes. That child runs the
stage command `qlora-pipeline ...` in a fork of itself (`command_here`), not through a shell and a
new interpreter that would hand it to the server (0.07 s a stage, benchmarks/bench_fork_dvc.py):

    flow -> server: fork -> child runs `dvc repro` -> fork -> grandchild runs `train`

A child is a copy of a process that has imported the libraries and run no math, so it computes
the same bytes a fresh process does (the committed reference run is reproduced with it, in CI).
It dies with its command: a SIGKILLed stage command takes its child with it. Without a server, with
a server pinned to other CPU kernels, or when the server is gone, the command runs in its own
process as before.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

ENV = "QLORA_PIPELINE_FORKSERVER"  # "<cpu_kernels>/<threads>@<server pid>@<socket path>"
PRELOAD = (
    "torch",
    "transformers",
    "transformers.trainer",
    "peft",
    "bitsandbytes",
    "datasets",
    "lm_eval",
    "lm_eval.models.huggingface",
    "qlora_pipeline.cli",
    "qlora_pipeline.modeling.bootstrap",
    "qlora_pipeline.data.prepare",
    "qlora_pipeline.training.train",
    "qlora_pipeline.modeling.export",
    "qlora_pipeline.evaluation.evaluate",
    "qlora_pipeline.reporting.report",
)
_STATUS = struct.Struct("!i")
_SERVING: str | None = None  # in the server and its children: the pins it serves


def pins(cpu_kernels: str, threads: int) -> str:
    """The pinning a server serves: commands whose params.yaml pins otherwise run on their own."""
    return f"{cpu_kernels}/{threads}"


def _params_pins(params: str) -> str | None:
    import yaml

    try:
        runtime = yaml.safe_load(Path(params).read_text(encoding="utf-8"))["runtime"]
        return pins(runtime["cpu_kernels"], runtime["threads"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None  # the command itself reports a bad params.yaml


def _connect(path: str, server_pid: int, timeout: float = 300.0) -> socket.socket | None:
    """Connect, waiting while the server still imports; None when it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                return None
            time.sleep(0.05)
    return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def delegate(argv: list[str], params: str) -> int | None:
    """Run this stage command in the fork server named by $QLORA_PIPELINE_FORKSERVER.

    Returns:
        The command's exit status, or None when it must run in this process (no server, a server
        with other pinned CPU kernels, or one that is gone).
    """
    address = os.environ.get(ENV)
    if not address or address.split("@", 1)[0] != _params_pins(params):
        return None
    return _call(address, "qlora-pipeline", argv, os.getcwd(), dict(os.environ), [0, 1, 2])


def dvc(address: str, argv: list[str], cwd: str, env: dict[str, str], quiet: bool) -> int | None:
    """Run `dvc <argv>` in a child of the fork server at `address`, whose DVC is imported
    already (a `dvc` process spends ~0.4 s starting, a child ~0.05 s). The child is a process of
    its own, so DVC's repository lock works as between `dvc` processes. `quiet`: its output is
    dropped, else it is this process' stdout/stderr.

    Returns:
        DVC's exit status, or None when the server is gone (run `dvc` as a process then).
    """
    with open(os.devnull, "r+b") as null:
        out, err = (null.fileno(), null.fileno()) if quiet else (1, 2)
        return _call(address, "dvc", argv, cwd, env, [null.fileno(), out, err])


def _call(
    address: str, program: str, argv: list[str], cwd: str, env: dict[str, str], fds: list[int]
) -> int | None:
    """Ask the server at `address` to run `program` (qlora-pipeline or dvc) with `argv` in a
    child with this working folder, environment and stdin/stdout/stderr; its exit status, or
    None when nothing was started."""
    _, pid, path = address.split("@", 2)
    sock = _connect(path, int(pid))
    if sock is None:
        return None
    with sock:
        request = {"program": program, "argv": argv, "cwd": cwd, "env": env}
        body = json.dumps(request).encode()
        try:
            socket.send_fds(sock, [struct.pack("!I", len(body))], fds)
            sock.sendall(body)
        except OSError:
            return None  # e.g. a closed stdin: nothing was started, run here
        status = _recv_exact(sock, _STATUS.size)
    if len(status) < _STATUS.size:
        print(f"error: the fork server ended before {program} did", file=sys.stderr)
        return 1
    return int(_STATUS.unpack(status)[0])


def _die_with_client(conn: socket.socket) -> None:
    """In the child: when the command that asked for it ends (killed), end too."""
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> int:
    signal.set_wakeup_fd(-1)  # the server's own handlers are not the stage's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    return _run(conn, request["program"], list(request["argv"]), request["cwd"], request["env"])


def _run(watch: socket.socket, program: str, argv: list[str], cwd: str, env: dict) -> int:
    """In a forked child: run `program` (qlora-pipeline or dvc) with `argv` in `cwd` with `env`,
    dying with whoever holds the other end of `watch`; its exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_die_with_client, args=(watch,), daemon=True).start()
    os.environ.clear()
    os.chdir(cwd)
    if program == "dvc":
        # its environment as given: the stage commands it runs find the server there
        os.environ.update(env)
        sys.argv = ["dvc", *argv]
        from qlora_pipeline.tracking.dvc_cli import main as entry
    else:
        os.environ.update({k: v for k, v in env.items() if k != ENV})
        os.environ["PYTHONHASHSEED"] = "0"  # as this process runs (the server was started so)
        sys.argv = ["qlora-pipeline", *argv]
        from qlora_pipeline.cli import main as entry
        from qlora_pipeline.tracking.perf import note

        note(forked=True)  # in the stage's record
    try:
        code = entry(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code


def _served_params(argv: list[str]) -> str | None:
    """The params.yaml a stage command `qlora-pipeline <argv>` reads; None when its arguments do
    not parse (it reports them itself)."""
    import io

    from qlora_pipeline.cli import STAGES, _parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = _parser().parse_args(argv)
    except SystemExit:
        return None
    return args.params if args.command in STAGES else None


def command_here(argv: list[str], cwd: str, env: dict[str, str]) -> int | None:
    """In a `dvc` child of the server: run the stage command `qlora-pipeline <argv>` that DVC is
    about to start through a shell in a fork of this process, as the server would run it, without
    the shell, a new interpreter and a request to the server (~0.07 s a stage). It dies with this
    process. Its exit status, or None when the server would not serve it (`delegate`): no server
    in `env`, another server's, or params pinned otherwise; DVC then starts it as before."""
    pinned, server, _ = (env.get(ENV) or "@0@").split("@", 2)
    if _SERVING is None or (pinned, server) != (_SERVING, str(os.getppid())):
        return None  # no server, or not the one this process is a child of
    params = _served_params(argv)
    if params is None or _params_pins(os.path.join(cwd, params)) != _SERVING:
        return None
    watch, hold = socket.socketpair()

    def command() -> int:
        hold.close()
        gc.freeze()  # DVC's objects too, as the server froze its imports' (`serve`)
        return _run(watch, "qlora-pipeline", argv, cwd, env)

    pid = _fork(command)
    watch.close()
    # as DVC waits for a command: Ctrl-C reaches the command, which ends; DVC then reports it
    ignore = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        hold.close()
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return _exit_code(status)


def _fork(child: Callable[[], int]) -> int:
    """Fork; the child runs `child` and exits with its status (1 on an exception, which it
    prints), its output flushed, without the interpreter's teardown. The child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return pid


def _exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _spawn(conn: socket.socket, listener: socket.socket) -> int | None:
    """Read one request and fork its child; the child's pid (None: a broken request)."""
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    if len(head) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    request = json.loads(_recv_exact(conn, struct.unpack("!I", head)[0]))

    def child() -> int:
        listener.close()
        return _child(conn, request, fds)

    pid = _fork(child)
    for fd in fds:
        os.close(fd)
    return pid


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each finished child's exit status to its command (128 + N for signal N)."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(_exit_code(status)))
        conn.close()


def serve(path: str, pinned: str) -> None:
    """The server: pin the kernels, import the libraries, then fork a child per request until
    the process that started it (the flow) is gone or it is terminated."""
    from qlora_pipeline.runtime import pin_cpu, setup_logging

    global _SERVING
    _SERVING = pinned
    parent = os.getppid()
    cpu_kernels, threads = pinned.split("/")
    setup_logging()  # quiets the libraries' import-time noise, in the children too
    pin_cpu(cpu_kernels, int(threads))
    for name in PRELOAD:
        importlib.import_module(name)
    from qlora_pipeline.tracking import dvc_cli

    dvc_cli.warm()  # DVC's modules, its parser, its lock fast path
    # The imports' objects (~600,000) leave the garbage collector's care, as Python's docs advise
    # before forking: every full collection in a child walked them all (and wrote to the pages
    # they sit on). DVC's work around a stage in a child: 1.37 s, 0.88 s frozen (2026-12-02);
    # since `warm`, 4% (benchmarks/bench_fork_dvc.py).
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    # a child's end wakes the loop at once (a byte on `ended`), not at its next 0.2 s tick
    ended, wake = os.pipe()
    os.set_blocking(ended, False)
    os.set_blocking(wake, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener.fileno(), ended], [], [], 0.2)
        if ended in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(ended, 4096)
        if listener.fileno() in ready:
            conn, _ = listener.accept()
            try:
                pid = _spawn(conn, listener)
            except (OSError, ValueError):
                pid = None
            if pid is None:
                conn.close()
            else:
                children[pid] = conn
        _reap(children)


_EARLY: dict[tuple[str, str | None], tuple[subprocess.Popen, str]] = {}


def _start(pinned: str, code: str | None) -> tuple[subprocess.Popen, str]:
    folder = tempfile.mkdtemp(prefix="qlora-forkserver-")  # short: socket paths are <108 bytes
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_pipeline.forkserver", os.path.join(folder, "socket"), pinned],
        env={**os.environ, "PYTHONHASHSEED": "0", **({"PYTHONPATH": code} if code else {})},
        stdin=subprocess.DEVNULL,
    )
    return proc, folder


def _stop(proc: subprocess.Popen, folder: str) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


def start_early(cpu_kernels: str, threads: int) -> None:
    """Start the server `serving` will use now, so that its imports (~8 s) overlap the flow's
    start (Prefect's temporary server, composing, `dvc status`) instead of delaying the first
    stage. A server no `serving` takes is stopped when this process exits."""
    key = (pins(cpu_kernels, threads), None)
    if key not in _EARLY:
        _EARLY[key] = _start(*key)
        atexit.register(_stop_unused, key)


def _stop_unused(key: tuple[str, str | None]) -> None:
    if key in _EARLY:
        _stop(*_EARLY.pop(key))


_SHARED: dict[tuple[str, str | None], str] = {}  # addresses of the servers `sharing` holds


@contextlib.contextmanager
def sharing(cpu_kernels: str, threads: int) -> Iterator[None]:
    """One fork server for every `serving` block inside this one with the same kernels (a
    sweep's points, side by side in threads: each stage command is its own fork)."""
    key = (pins(cpu_kernels, threads), None)
    with serving(cpu_kernels, threads) as address:
        _SHARED[key] = address
        try:
            yield
        finally:
            del _SHARED[key]


@contextlib.contextmanager
def serving(cpu_kernels: str, threads: int, code: str | None = None) -> Iterator[str]:
    """Start a fork server for the run's pinned kernels (or take the one `start_early` started,
    or use the one `sharing` holds); yields its address, the value of $QLORA_PIPELINE_FORKSERVER
    for the stage commands. Stopped (its socket removed) on exit. `code`: a folder whose
    `qlora_pipeline` the server imports instead of this one (`reproduce` runs a revision's own
    code)."""
    pinned = pins(cpu_kernels, threads)
    if (pinned, code) in _SHARED:
        yield _SHARED[(pinned, code)]
        return
    early = _EARLY.pop((pinned, code), None)
    proc, folder = early or _start(pinned, code)
    try:
        yield f"{pinned}@{proc.pid}@{os.path.join(folder, 'socket')}"
    finally:
        _stop(proc, folder)


if __name__ == "__main__":
    # nothing to write or flush: ending the interpreter (torch, transformers, ... loaded) took 2 s
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stages themselves
    # the importable module, not this `__main__` copy: its children import it (`command_here`)
    from qlora_pipeline.forkserver import serve as serve_here

    serve_here(sys.argv[1], sys.argv[2])
