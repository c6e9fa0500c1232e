"""The local stack: addresses, settings hand-over, supervisord's config, the lock, held ports, and
real supervisord processes (Redis, the Temporal dev server) for what needs them."""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import stack
from tenanttune.settings import Settings

pytestmark = pytest.mark.timeout(180)
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
needs_redis_server = pytest.mark.skipif(
    stack.find_redis_server() is None, reason="no redis-server binary here"
)
needs_temporal = pytest.mark.skipif(stack.find_temporal_binary() is None, reason="no temporal CLI")


def wait_for(predicate: object, timeout_s: float = 10.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.fixture
def stack_settings(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=tmp_path / "state",
        temporal_address=f"127.0.0.1:{stack._free_port()}",
        temporal_ui_port=stack._free_port(),
        redis_url=UNREACHABLE_REDIS,
        api_port=stack._free_port(),
    )
    yield settings
    stack.stop(settings, timeout_s=20)  # never leave a stack behind, whatever the test did


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port held by a process that is not the stack (this test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:7233", ("localhost", 7233)),
        ("127.0.0.1:17233", ("127.0.0.1", 17233)),
        ("[::1]:7233", ("::1", 7233)),
        ("my-ns.a1b2c.tmprl.cloud:7233", ("my-ns.a1b2c.tmprl.cloud", 7233)),
        ("temporal", ("temporal", 7233)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert stack._split_host_port(address, 7233) == expected


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True)]
    + [("10.0.0.5", False), ("temporal.internal", False), ("0.0.0.0", False)],
)
def test_only_loopback_addresses_get_an_embedded_temporal(host: str, loopback: bool) -> None:
    assert stack._is_loopback(host) is loopback


def test_children_see_the_same_settings_as_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    original = Settings(
        state_dir=Path("rel-state"),
        api_port=18123,
        temporal_tls=True,
        validation_share=0.2,
        temporal_api_key=None,
        environment="development",
    )
    env = stack._settings_env(original)
    assert env["STATE_DIR"] == str(tmp_path / "rel-state")  # relative paths made absolute
    assert env["TEMPORAL_API_KEY"] is None  # unset, not the string "None"
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.chdir("/")  # children run elsewhere (the repository root)
    rebuilt = Settings()
    paths = {"state_dir", "data_dir", "models_dir"}
    for name in paths:
        assert getattr(rebuilt, name) == tmp_path / getattr(original, name)
    assert rebuilt.model_dump(exclude=paths) == original.model_dump(exclude=paths)


def test_stack_info_round_trips_through_stack_json() -> None:
    info = stack.StackInfo(
        supervisor_pid=123,
        started_at=1.5,
        state_dir="/s",
        log_dir="/s/logs",
        temporal_address="localhost:7233",
        temporal_namespace="default",
        temporal_ui_url="http://127.0.0.1:8233",
        redis_url="redis://127.0.0.1:4000/0",
        api_url="http://127.0.0.1:8000",
        managed=["temporal", "api", "worker"],
    )
    assert stack.StackInfo.from_json(info.to_json()) == info
    running = stack.StackInfo.from_json(dataclasses.replace(info, already_running=True).to_json())
    assert not running.already_running  # a property of one answer, not of the stack


def test_redis_password_is_not_shown() -> None:
    assert stack.redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert stack.redact_url("redis://me:s3cret@host/0") == "redis://me:***@host/0"
    assert stack.redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_lock_says_whether_a_stack_runs(tmp_path: Path) -> None:
    assert not stack._lock_held(tmp_path)
    fd = stack._take_lock(tmp_path)
    assert fd is not None
    try:
        assert stack._lock_held(tmp_path)
        assert stack._take_lock(tmp_path, tries=2) is None  # a second `up` is refused
    finally:
        os.close(fd)
    assert not stack._lock_held(tmp_path)


def test_supervisord_config_keeps_every_program_with_restarts(tmp_path: Path) -> None:
    state = tmp_path / "100%-state"  # supervisord %-interpolates its values
    info = stack.StackInfo(
        0, 0.0, str(state), str(state / "logs"), "127.0.0.1:7233", "default", None, "", None
    )
    state.mkdir()
    programs = {"temporal": ["temporal", "server", "start-dev"], "api": ["uvicorn", "a b"]}
    conf = configparser.ConfigParser()  # the same %-interpolation as supervisord's
    conf.read(stack._write_config(info, programs))
    assert conf["unix_http_server"]["file"] == str(state / "supervisor.sock")
    assert conf["supervisord"]["logfile"] == str(state / "logs" / "supervisord.log")
    temporal, api = conf["program:temporal"], conf["program:api"]
    guard = "-m cli.child --unset-prefix TEMPORAL_ --"  # the dev server reads TEMPORAL_* too
    assert temporal["command"].endswith(f"{guard} temporal server start-dev")
    assert api["command"].endswith("-m cli.child -- uvicorn 'a b'")
    assert temporal["autostart"] == "true" and api["autostart"] == "false"  # after readiness
    for program in (temporal, api):
        assert program["autorestart"] == "true"
        assert int(program["startretries"]) >= 5
        assert program["stopasgroup"] == program["killasgroup"] == "true"
    assert int(temporal["priority"]) < int(api["priority"])  # stopped after the API


def test_a_long_state_dir_gets_a_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    assert len(str(stack._socket_path(deep))) < 100
    assert stack._socket_path(deep) != stack._socket_path(tmp_path / ("e" * 120))


def test_status_without_a_stack_says_so(stack_settings: Settings) -> None:
    by_name = {c.name: c for c in stack.status(stack_settings)}
    assert list(by_name) == ["supervisor", "temporal", "redis", "api", "worker"]
    assert not by_name["supervisor"].healthy
    assert "no stack running" in by_name["supervisor"].detail
    assert not by_name["temporal"].healthy  # nothing listens on the free port
    assert not by_name["redis"].healthy
    assert not by_name["api"].healthy
    assert not by_name["worker"].healthy and by_name["worker"].pid is None


def test_down_without_a_stack_tidies_stale_files(stack_settings: Settings) -> None:
    state = stack_settings.state_dir.absolute()
    state.mkdir(parents=True)
    for name in (stack.STACK_FILE, stack.PID_FILE, "supervisor.sock"):
        (state / name).write_text("left by a killed stack")
    assert stack.stop(stack_settings) is False
    assert not [p.name for p in state.iterdir() if p.name != stack.LOCK_FILE]


def test_an_api_port_held_by_another_process_is_named(
    stack_settings: Settings, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    settings = stack_settings.model_copy(update={"api_port": port})
    with pytest.raises(stack.StackError, match=f"port {port} \\(API_PORT\\) is already in use"):
        stack.start_detached(settings, timeout_s=30, components=["api", "worker"])
    assert not stack._lock_held(settings.state_dir)  # nothing started, nothing held


@needs_temporal
def test_temporal_ports_held_by_another_process_are_named(
    stack_settings: Settings, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    ui_held = stack_settings.model_copy(update={"temporal_ui_port": port})
    with pytest.raises(stack.StackError, match=f"port {port} \\(TEMPORAL_UI_PORT\\)"):
        stack.start_detached(ui_held, timeout_s=30, components=["temporal"])
    # TEMPORAL_ADDRESS left at its default: whatever listens there is not ours to use.
    by_default = stack_settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
    by_default.model_fields_set.discard("temporal_address")
    with pytest.raises(stack.StackError, match=f"port {port} \\(TEMPORAL_ADDRESS\\).*explicitly"):
        stack.start_detached(by_default, timeout_s=30, components=["temporal"])
    # Named on purpose, but what listens there is no Temporal server.
    chosen = stack_settings.model_copy(update={"temporal_address": f"127.0.0.1:{port}"})
    with pytest.raises(stack.StackError, match=f"port {port} .*does not answer as Temporal"):
        stack.start_detached(chosen, timeout_s=30, components=["temporal"])


def test_a_remote_temporal_that_does_not_answer_is_reported_and_nothing_starts(
    stack_settings: Settings,
) -> None:
    # 0.0.0.0 is not a loopback name (so it counts as remote), yet it is dialled on this host.
    address = f"0.0.0.0:{stack._free_port()}"
    settings = stack_settings.model_copy(update={"temporal_address": address})
    with pytest.raises(stack.StackError, match="does not answer"):
        stack.start_detached(settings, timeout_s=30)
    assert not (settings.state_dir / "supervisord.conf").exists()


def test_a_program_runs_without_the_named_variables_and_ends_with_its_parent(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "TEMPORAL_ADDRESS": "elsewhere:7233", "KEEP_ME": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "cli.child", "--unset-prefix", "TEMPORAL_", "--", "env"],
        cwd=stack.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "KEEP_ME=1" in out and "TEMPORAL_ADDRESS" not in out
    pid_file = tmp_path / "child.pid"
    script = f"echo $$ > {pid_file}; exec sleep 300"
    guarded = [sys.executable, "-m", "cli.child", "--", "sh", "-c", script]
    parent = subprocess.Popen(  # a parent that starts a guarded child, then waits
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *guarded],
        cwd=stack.REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
        child = int(pid_file.read_text())
        assert stack._pid_alive(child)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        assert wait_for(lambda: not stack._pid_alive(child), 10), "the child outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.integration
@needs_redis_server
def test_detached_stack_starts_reports_restarts_and_stops(stack_settings: Settings) -> None:
    info = stack.start_detached(stack_settings, timeout_s=60, components=["redis"])
    assert info.managed == ["redis"] and info.redis_url != UNREACHABLE_REDIS
    assert stack._redis_ping(info.redis_url) is None
    assert (stack_settings.state_dir / "logs" / "redis.log").exists()

    again = stack.start_detached(stack_settings, components=["redis"])
    assert again.already_running and again.supervisor_pid == info.supervisor_pid
    assert stack.run_foreground(stack_settings, components=["redis"]) == stack.EXIT_ALREADY_RUNNING

    by_name = {c.name: c for c in stack.status(stack_settings)}
    assert by_name["supervisor"].healthy and by_name["supervisor"].pid == info.supervisor_pid
    redis_pid = by_name["redis"].pid
    assert by_name["redis"].healthy and by_name["redis"].managed and redis_pid

    os.kill(redis_pid, signal.SIGKILL)  # supervisord starts another one on the same port

    def restarted() -> bool:
        now = {c.name: c for c in stack.status(stack_settings)}["redis"]
        return now.healthy and now.pid not in (None, redis_pid)

    assert wait_for(restarted, 15)
    assert stack._pid_alive(info.supervisor_pid)

    assert stack.stop(stack_settings) is True
    assert not stack._pid_alive(info.supervisor_pid)
    assert stack._redis_ping(info.redis_url, 0.5) is not None
    assert not (stack_settings.state_dir / stack.STACK_FILE).exists()
    assert stack.stop(stack_settings) is False


@pytest.mark.integration
@needs_redis_server
def test_programs_end_when_supervisord_is_killed(stack_settings: Settings) -> None:
    info = stack.start_detached(stack_settings, timeout_s=60, components=["redis"])
    redis_pid = {c.name: c.pid for c in stack.status(stack_settings)}["redis"]
    assert redis_pid
    os.kill(info.supervisor_pid, signal.SIGKILL)
    assert wait_for(lambda: not stack._pid_alive(redis_pid))
    assert stack.stop(stack_settings) is False  # stale: tidied, nothing was running
    assert stack.start_detached(stack_settings, timeout_s=60, components=["redis"]).managed


@pytest.mark.integration
@needs_temporal
def test_embedded_temporal_comes_up_with_search_attributes_and_goes(
    stack_settings: Settings, tmp_path: Path
) -> None:
    settings = stack_settings.model_copy(update={"temporal_namespace": "stack-test"})
    info = stack.start_detached(settings, timeout_s=90, components=["temporal"])
    assert info.managed == ["temporal"]
    assert info.temporal_ui_url == f"http://127.0.0.1:{settings.temporal_ui_port}"
    listed = subprocess.run(
        [str(stack.find_temporal_binary()), "operator", "search-attribute", "list"]
        + ["--address", settings.temporal_address, "--namespace", "stack-test"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "CompanyId" in listed and "JobKind" in listed and "ModelVersion" in listed
    temporal_pid = {c.name: c.pid for c in stack.status(settings)}["temporal"]
    assert temporal_pid

    # A second stack whose TEMPORAL_ADDRESS names this server on purpose uses it.
    other = settings.model_copy(update={"state_dir": tmp_path / "other"})
    try:
        assert stack.start_detached(other, timeout_s=60, components=["temporal"]).managed == []
        assert {c.name: c.healthy for c in stack.status(other)}["temporal"]
    finally:
        stack.stop(other)

    assert stack.stop(settings) is True
    assert not stack._pid_alive(temporal_pid)
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", stack._split_host_port(settings.temporal_address, 0)[1]))
