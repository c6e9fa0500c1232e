"""The whole stack as a user runs it: `tenanttune up`, the demo over HTTP, `down`, Ctrl-C.
(Programs killed under `up --detach` and restarted: test_stack_restarts.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
CLI = [sys.executable, "-m", "cli.main"]


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a private stack: own ports, dirs and Redis database."""
    env = {
        **os.environ,
        "STATE_DIR": str(tmp_path / "state"),
        "DATA_DIR": str(tmp_path / "data"),
        "MODELS_DIR": str(tmp_path / "models"),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "TEMPORAL_UI_PORT": str(free_port()),
        "API_PORT": str(free_port()),
        "REDIS_URL": "redis://127.0.0.1:6379/14",
    }
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()  # a mirror of this stack's jobs only
    yield env
    subprocess.run([*CLI, "down"], env=env, cwd=tmp_path, timeout=60, check=False)
    assert not stack_processes(tmp_path), "processes outlived `tenanttune down`"


def stack_processes(tmp_path: Path) -> list[str]:
    """Command lines of live processes that belong to this test's stack."""
    return [cmd for _, cmd in stack_pids(tmp_path)]


def stack_pids(tmp_path: Path) -> list[tuple[int, str]]:
    """Pids and command lines of live processes that belong to this test's stack."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes()
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        if stat[2] != "Z" and str(tmp_path).encode() in env + cmd.encode():
            found.append((int(proc.name), cmd))
    return found


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(
        [*CLI, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"tenanttune {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def test_detached_stack_runs_the_demo_and_stops_cleanly(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    out = run_cli(["up", "--detach"], stack_env, tmp_path, timeout=180)
    assert "running in the background" in out
    assert "was already running" in run_cli(["up", "--detach"], stack_env, tmp_path, 180)
    status = run_cli(["status"], stack_env, tmp_path, timeout=60)
    for part in ("supervisor", "temporal", "redis", "api", "worker"):
        line = next(x for x in status.splitlines() if f" {part} " in f" {x} ")
        assert "✓" in line, status
    assert "polling model-training" in status and "/healthz 200" in status
    # A second `up` while this one runs is refused, not fought over.
    second = subprocess.run(
        [*CLI, "up"], env=stack_env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 2 and "already runs" in second.stderr + second.stdout

    out = run_cli(["demo", "--company", "globex", "--epochs", "1"], stack_env, tmp_path, 600)
    assert "trained model:" in out
    model_dir = Path(stack_env["MODELS_DIR"]) / "globex"
    (version,) = [p for p in model_dir.iterdir() if p.is_dir()]
    assert (version / "adapter_model.safetensors").exists()
    assert (version / "manifest.json").exists()
    # ... then deployed to the local registry and asked a question from the validation split.
    assert "deployed tiny-mistral-company-globex:demo" in out
    answer = next(line for line in out.splitlines() if "answer:" in line)
    assert answer.split("answer:", 1)[1].strip()
    registry = Path(stack_env["MODELS_DIR"]) / "registry" / "tiny-mistral-company-globex" / "demo"
    assert (registry / "model.gguf").exists() and (registry / "Modelfile").exists()

    # The demo did not start the stack, so it leaves it running; the API still answers.
    api = f"http://127.0.0.1:{stack_env['API_PORT']}"
    assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
    token = run_cli(["token", "--company", "globex"], stack_env, tmp_path, 60).strip()
    job = httpx.get(
        f"{api}/api/ai/jobs/{version.name}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    assert job["state"] == "completed" and job["companyId"] == "globex"

    # The operator's CLI sees the same jobs (Temporal + Redis directly, no HTTP).
    listed = run_cli(["jobs", "list", "--company", "globex"], stack_env, tmp_path, 60)
    assert version.name in listed and "completed" in listed
    assert '"state": "completed"' in run_cli(
        ["jobs", "show", version.name], stack_env, tmp_path, 60
    )
    counts = run_cli(["queue", "counts", "model-training"], stack_env, tmp_path, 60)
    assert "completed  1" in counts
    assert "restored 2 jobs" in run_cli(["cache", "rebuild"], stack_env, tmp_path, 60)

    out = run_cli(["down"], stack_env, tmp_path, timeout=60)
    assert "stack stopped" in out
    deadline = time.monotonic() + 15
    while stack_processes(tmp_path):
        assert time.monotonic() < deadline, stack_processes(tmp_path)
        time.sleep(0.3)


def test_foreground_stack_stops_everything_on_ctrl_c(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [*CLI, "up"],
        env=stack_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{stack_env['API_PORT']}/healthz"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(api, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the stack did not come up"
        time.sleep(0.5)
    assert len(stack_processes(tmp_path)) >= 4  # supervisord, temporal, api, worker
    # A worker that dies is replaced; the foreground stack and its API carry on.
    (worker,) = [pid for pid, cmd in stack_pids(tmp_path) if cmd.endswith("worker.py ")]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not [p for p, cmd in stack_pids(tmp_path) if cmd.endswith("worker.py ") and p != worker]:
        assert time.monotonic() < deadline, "no new worker"
        time.sleep(0.3)
    assert proc.poll() is None
    assert httpx.get(api, timeout=5).status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while stack_processes(tmp_path):
        assert time.monotonic() < deadline, stack_processes(tmp_path)
        time.sleep(0.3)
