"""Real processes to break: a Temporal dev server, then API and worker processes the test owns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tenanttune import stack
from tenanttune.auth import mint_token
from tenanttune.settings import Settings
from tests.conftest import REPO, free_port, seed_tenant, wait_until_healthy


@dataclass
class Cluster:
    """Settings, env and the processes of one fault test; each can be killed and restarted."""

    settings: Settings
    env: dict[str, str]
    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def start(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        cmd = {
            "api": [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.settings.api_port),
            ],
            "worker": [sys.executable, "worker.py"],
            "worker2": [sys.executable, "worker.py"],
        }[name]
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**self.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        if name == "api":
            log_file = self.root / "api.log"
            wait_until_healthy(
                self.api_url,
                lambda: None if proc.poll() is None else log_file.read_text()[-2000:],
            )
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)

    def headers(self, company: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.settings, company)}"}

    def job(self, company: str, job_id: str) -> dict[str, object]:
        r = httpx.get(
            f"{self.api_url}/api/ai/jobs/{job_id}", headers=self.headers(company), timeout=30
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait_for(self, company: str, job_id: str, timeout_s: float = 300) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(company, job_id)
            if job["state"] in ("completed", "failed"):
                return job
            time.sleep(0.5)
        raise AssertionError(f"{job_id} did not finish in {timeout_s}s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    redis_url = "redis://127.0.0.1:6379/15"
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_ui_port=free_port(),
        api_port=free_port(),
        redis_url=redis_url,
        # Short, so a dead worker's activity is noticed in seconds, not a minute.
        train_heartbeat_timeout_s=10,
        train_save_steps=5,
        deploy_heartbeat_timeout_s=15,
    )
    env = {
        **os.environ,
        "STATE_DIR": str(settings.state_dir),
        "DATA_DIR": str(settings.data_dir),
        "MODELS_DIR": str(settings.models_dir),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "API_PORT": str(settings.api_port),
        "REDIS_URL": redis_url,
        "TRAIN_HEARTBEAT_TIMEOUT_S": "10",
        "TRAIN_SAVE_STEPS": "5",
        "DEPLOY_HEARTBEAT_TIMEOUT_S": "15",
    }
    stack.start_detached(settings, components=("temporal",))
    c = Cluster(settings, env, tmp_path)
    try:
        yield c
    finally:
        for name in list(c.procs):
            proc = c.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        stack.stop(settings)


__all__ = ["Cluster", "seed_tenant"]
