"""A crashed worker or API under `tenanttune up --detach`: supervisord starts a new one within
10 s, the other processes never notice, and the training job that was running completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import stack
from tenanttune.auth import mint_token, with_local_secret
from tenanttune.settings import Settings
from tests.conftest import free_port, seed_tenant
from training.base_model import build_tiny_base

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
CLI = [sys.executable, "-m", "cli.main"]
BACK_WITHIN_S = 10.0
# Small, but long enough (~55 steps) that the kill lands in the middle of training.
BODY = {"epochs": 4, "batchSize": 8, "learningRate": 0.003, "loraRank": 8}


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def headers(self, company: str) -> dict[str, str]:
        signing = with_local_secret(self.settings)  # the secret `up` made, as `tenanttune token`
        return {"Authorization": f"Bearer {mint_token(signing, company)}"}

    def pids(self) -> dict[str, int | None]:
        """What `tenanttune status` shows: each part's pid (supervisord's too)."""
        return {c.name: c.pid for c in stack.status(self.settings)}

    def pid(self, name: str) -> int:
        info = stack._rpc(self.settings.state_dir).getProcessInfo(name)
        return int(info["pid"])

    def train(self, company: str) -> str:
        seed_tenant(self.settings, company, lines=120)
        r = httpx.post(
            f"{self.api}/api/ai/models/{company}/train",
            json=BODY,
            headers=self.headers(company),
            timeout=30,
        )
        assert r.status_code == 202, r.text
        return str(r.json()["jobId"])

    def job(self, company: str, job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.api}/api/ai/jobs/{job_id}", headers=self.headers(company), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def until(self, what: str, ready: Callable[[], bool], timeout_s: float) -> float:
        """Seconds until `ready()` holds; fails after timeout_s."""
        start = time.monotonic()
        while not ready():
            assert time.monotonic() - start < timeout_s, f"{what} took over {timeout_s:.0f} s"
            time.sleep(0.1)
        return time.monotonic() - start

    def training_midway(self, company: str, job_id: str, progress: float) -> None:
        """Until the job trains, at `progress` percent or more, with a checkpoint written."""
        checkpoints = self.settings.runs_dir / job_id / "checkpoints"

        def midway() -> bool:
            job = self.job(company, job_id)
            assert job["state"] not in ("completed", "failed"), f"finished too soon: {job}"
            if job["stage"] != "training" or job["progress"] < progress:
                return False
            return any(checkpoints.glob("checkpoint-*"))

        self.until("training to reach a checkpoint", midway, 300)

    def finished(self, company: str, job_id: str) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def done() -> bool:
            last.update(self.job(company, job_id))
            return last["state"] in ("completed", "failed")

        self.until(f"job {job_id}", done, 300)
        return last


class Watcher(threading.Thread):
    """Asks the API for /healthz and for a job, back to back, and keeps every failure."""

    def __init__(self, up: Stack, company: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.up, self.company, self.job_id = up, company, job_id
        self.stopped = threading.Event()
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        headers = self.up.headers(self.company)
        with httpx.Client(base_url=self.up.api, headers=headers, timeout=10) as client:
            while not self.stopped.is_set():
                for path in ("/healthz", f"/api/ai/jobs/{self.job_id}"):
                    try:
                        r = client.get(path)
                    except httpx.HTTPError as exc:
                        self.failures.append(f"GET {path}: {exc!r}")
                        continue
                    if r.status_code == 200:
                        self.answered += 1
                    else:
                        self.failures.append(f"GET {path}: {r.status_code} {r.text[:200]}")
                time.sleep(0.25)


def stack_processes(root: Path) -> list[str]:
    """Command lines of live processes that belong to this stack (they carry its dirs)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z" and str(root).encode() in env + cmd.encode():
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private stack started as a user starts it: `tenanttune up --detach`."""
    root = tmp_path_factory.mktemp("restarts")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=root / "state",
        data_dir=root / "data",
        models_dir=root / "models",
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_ui_port=free_port(),
        api_port=free_port(),
        redis_url="redis://127.0.0.1:6379/10",
        redis_prefix=f"bull-restarts-{uuid.uuid4().hex[:8]}",  # this run's jobs only
        # The dead worker's training try is retried after this; the SDK heartbeats every
        # 0.8 x of it, so 20 s keeps a margin on a busy 2-core machine.
        train_heartbeat_timeout_s=20,
        train_save_steps=5,
        base_model=str(root / "base"),
        worker_metrics_port=0,
        rate_limit_per_minute=0,  # the watcher asks many times a second
    )
    build_tiny_base(root / "base")  # built here, so the stack's first job does not wait for it
    env = {k: v for k, v in stack._settings_env(settings).items() if v is not None}
    env = {**os.environ, **env}
    out = subprocess.run(
        [*CLI, "up", "--detach"], env=env, cwd=root, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield Stack(settings, env)
    finally:
        subprocess.run([*CLI, "down"], env=env, cwd=root, timeout=120, check=False)
        deadline = time.monotonic() + 20
        while stack_processes(root):
            assert time.monotonic() < deadline, stack_processes(root)
            time.sleep(0.3)


def test_a_killed_worker_is_replaced_in_seconds_and_its_job_completes(up: Stack) -> None:
    job_id = up.train("wk")
    up.training_midway("wk", job_id, progress=40)  # less to train again after the kill
    before = up.pids()
    watcher = Watcher(up, "wk", job_id)
    watcher.start()
    try:
        os.kill(up.pid("worker"), signal.SIGKILL)  # no cleanup code runs in the worker

        def new_worker_polls() -> bool:
            pid = up.pid("worker")
            if pid in (0, before["worker"]):
                return False
            polling = stack._polling(pid)  # the new worker's pid@host among the pollers
            return stack._on_temporal(up.settings, up.settings.temporal_address, polling) is None

        took = up.until("a new worker polling", new_worker_polls, BACK_WITHIN_S)
        job = up.finished("wk", job_id)
    finally:
        watcher.stopped.set()
        watcher.join()
    assert job["state"] == "completed", job
    after = {c.name: c for c in stack.status(up.settings)}
    assert after["worker"].healthy and after["worker"].pid != before["worker"]
    for name in ("supervisor", "temporal", "api"):
        assert after[name].healthy and after[name].pid == before[name], after[name]
    assert watcher.answered > 50 and not watcher.failures, watcher.failures[:5]
    # The killed try was retried on the new worker, from the last checkpoint.
    assert job["result"]["metrics"]["resumedFromStep"] > 0, job["result"]
    print(f"new worker polling {took:.1f} s after kill -9; {watcher.answered} API answers")


def test_a_killed_api_is_replaced_in_seconds_and_the_job_completes(up: Stack) -> None:
    job_id = up.train("ap")
    up.training_midway("ap", job_id, progress=0)
    before = up.pids()
    os.kill(up.pid("api"), signal.SIGKILL)

    def new_api_answers() -> bool:
        if up.pid("api") in (0, before["api"]):
            return False
        try:
            return httpx.get(f"{up.api}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    took = up.until("a new API answering", new_api_answers, BACK_WITHIN_S)
    job = up.finished("ap", job_id)
    assert job["state"] == "completed", job
    after = {c.name: c for c in stack.status(up.settings)}
    assert after["api"].healthy and after["api"].pid != before["api"]
    for name in ("supervisor", "temporal", "worker"):
        assert after[name].healthy and after[name].pid == before[name], after[name]
    # Training went on untouched while the API was down: one try, never resumed.
    assert job["result"]["metrics"]["resumedFromStep"] == 0, job["result"]
    print(f"new API answering {took:.1f} s after kill -9")
