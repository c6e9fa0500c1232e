"""The local stack launcher: addresses, settings hand-over, the lock, and real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenanttune import stack
from tenanttune.settings import Settings

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


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
        state_dir=tmp_path / "state",
        temporal_address=f"127.0.0.1:{stack._free_port()}",
        temporal_ui_port=stack._free_port(),
        redis_url=UNREACHABLE_REDIS,
        api_port=stack._free_port(),
    )
    yield settings
    stack.stop(settings, timeout_s=20)  # never leave a stack behind, whatever the test did


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
        components=[stack.ComponentInfo("redis", "redis://127.0.0.1:4000/0", True, 5, 99, "/l")],
    )
    again = stack.StackInfo.from_json(info.to_json())
    assert again == info
    assert again.component("redis") == info.components[0]
    assert again.component("worker") is None


def test_redis_password_is_not_shown() -> None:
    assert stack._redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert stack._redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_lock_says_whether_a_supervisor_runs(tmp_path: Path) -> None:
    assert stack._lock_holder(tmp_path) is None
    fd = stack._acquire_lock(tmp_path)
    assert fd is not None
    try:
        assert stack._lock_holder(tmp_path) == os.getpid()
        assert stack._acquire_lock(tmp_path, attempts=2) is None  # a second one is refused
    finally:
        os.close(fd)
    assert stack._lock_holder(tmp_path) is None


def test_status_without_a_stack_says_so(stack_settings: Settings) -> None:
    by_name = {c.name: c for c in stack.status(stack_settings)}
    assert list(by_name) == ["supervisor", "temporal", "redis", "api", "worker"]
    assert not by_name["supervisor"].healthy
    assert "no stack running" in by_name["supervisor"].detail
    assert not by_name["temporal"].healthy  # nothing listens on the free port
    assert not by_name["redis"].healthy
    assert not by_name["worker"].healthy and by_name["worker"].pid is None


def test_down_cleans_a_stale_stack_and_what_it_left(stack_settings: Settings) -> None:
    state_dir = stack_settings.state_dir.absolute()
    state_dir.mkdir(parents=True)
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        stale = stack.StackInfo(
            supervisor_pid=leftover.pid + 10**6,  # no such process
            started_at=0.0,
            state_dir=str(state_dir),
            log_dir=str(state_dir / "logs"),
            temporal_address=stack_settings.temporal_address,
            temporal_namespace="default",
            temporal_ui_url=None,
            redis_url=UNREACHABLE_REDIS,
            api_url=None,
            components=[
                stack.ComponentInfo(
                    "worker", "", True, leftover.pid, stack._proc_start_time(leftover.pid)
                )
            ],
        )
        (state_dir / stack.STACK_FILE).write_text(stale.to_json())
        assert stack.stop(stack_settings) is False
        assert not (state_dir / stack.STACK_FILE).exists()
        assert leftover.wait(timeout=10) is not None
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


needs_redis_server = pytest.mark.skipif(
    stack.find_redis_server() is None, reason="no redis-server binary here"
)


@pytest.mark.integration
@needs_redis_server
def test_detached_stack_starts_reports_and_stops(stack_settings: Settings) -> None:
    info = stack.start_detached(stack_settings, timeout_s=60, components=["redis"])
    redis_info = info.component("redis")
    assert redis_info is not None and redis_info.managed and redis_info.pid
    assert info.redis_url != UNREACHABLE_REDIS
    assert stack._redis_ping(info.redis_url, 1.0) is None

    again = stack.start_detached(stack_settings, components=["redis"])
    assert again.already_running and again.supervisor_pid == info.supervisor_pid

    by_name = {c.name: c for c in stack.status(stack_settings)}
    assert by_name["supervisor"].healthy and by_name["supervisor"].pid == info.supervisor_pid
    assert by_name["redis"].healthy and by_name["redis"].pid == redis_info.pid

    assert stack.stop(stack_settings) is True
    assert not stack._pid_alive(redis_info.pid)
    assert not stack._pid_alive(info.supervisor_pid)
    assert not (stack_settings.state_dir / stack.STACK_FILE).exists()
    assert stack.stop(stack_settings) is False


@pytest.mark.integration
@needs_redis_server
def test_children_die_when_the_supervisor_is_killed(stack_settings: Settings) -> None:
    info = stack.start_detached(stack_settings, timeout_s=60, components=["redis"])
    redis_info = info.component("redis")
    assert redis_info is not None and redis_info.pid
    os.kill(info.supervisor_pid, signal.SIGKILL)
    assert wait_for(lambda: not stack._pid_alive(redis_info.pid, redis_info.pid_start))
    assert stack.stop(stack_settings) is False  # stale: cleaned, nothing was running


@pytest.mark.integration
def test_a_remote_temporal_that_is_down_is_reported_and_nothing_starts(
    stack_settings: Settings,
) -> None:
    settings = stack_settings.model_copy(update={"temporal_address": "192.0.2.1:7233"})
    with pytest.raises(stack.StackError, match="not reachable"):
        stack.start_detached(settings, timeout_s=60)
    log = (settings.state_dir / "logs" / "stack.log").read_text()
    assert "started temporal" not in log and "started redis" not in log


@pytest.mark.integration
@pytest.mark.skipif(stack.find_temporal_binary() is None, reason="no temporal CLI here")
def test_embedded_temporal_comes_up_with_search_attributes_and_goes(
    stack_settings: Settings,
) -> None:
    settings = stack_settings.model_copy(update={"temporal_namespace": "stack-test"})
    info = stack.start_detached(settings, timeout_s=90, components=["temporal"])
    temporal = info.component("temporal")
    assert temporal is not None and temporal.managed and temporal.pid
    assert info.temporal_ui_url == f"http://127.0.0.1:{settings.temporal_ui_port}"
    listed = subprocess.run(
        [str(stack.find_temporal_binary()), "operator", "search-attribute", "list"]
        + ["--address", settings.temporal_address, "--namespace", "stack-test"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "CompanyId" in listed and "JobKind" in listed
    assert stack.stop(settings) is True
    assert not stack._pid_alive(temporal.pid)
    host, port = stack._split_host_port(settings.temporal_address, 7233)
    assert not stack._port_open(host, port)


def test_module_runs_as_the_supervisor_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tenanttune.stack", "--help"],
        cwd=stack.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--components" in out
