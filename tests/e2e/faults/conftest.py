"""Real processes to break: a Temporal dev server, then API and worker processes the test owns."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from temporalio.api.enums.v1 import EventType, PendingActivityState, TimeoutType
from temporalio.api.failure.v1 import Failure

from cli import stack
from tenanttune.auth import mint_token
from tenanttune.settings import Settings
from tenanttune.temporal import connect
from tests.conftest import REPO, free_port, seed_tenant, wait_until_healthy


@dataclass
class Running:
    """An activity attempt Temporal has not seen finish, as `temporal workflow describe` shows."""

    attempt: int
    started: bool  # False: still waiting in its task queue for a worker (a free slot)
    worker: str  # identity (`pid@host`) of the worker running it; "" while it waits
    details: dict[str, Any]  # its last heartbeat's details


@dataclass
class Attempt:
    """The attempt of an activity that finished it (a retried activity shows only its last)."""

    attempt: int
    outcome: str  # completed, failed, timed_out, cancelled
    worker: str
    after: str  # what ended the attempt before it: "heartbeat timeout", an error message, ""


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

    def identity(self, name: str) -> str:
        """The Temporal worker identity of one of our worker processes (the SDK's default)."""
        return f"{self.procs[name].pid}@{socket.gethostname()}"

    def running(self, job_id: str, activity: str) -> Running | None:
        """The job's attempt of `activity` that is waiting or running right now, if any."""

        async def describe() -> Running | None:
            client = await connect(self.settings)
            desc = await client.get_workflow_handle(job_id).describe()
            for pending in desc.raw_description.pending_activities:
                if pending.activity_type.name != activity:
                    continue
                details: dict[str, Any] = {}
                if pending.heartbeat_details.payloads:
                    decoded = await client.data_converter.decode(pending.heartbeat_details.payloads)
                    details = decoded[0] if decoded and isinstance(decoded[0], dict) else {}
                started = pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                return Running(
                    pending.attempt,
                    started,
                    pending.last_worker_identity if started else "",
                    details,
                )
            return None

        return asyncio.run(describe())

    def attempts(self, job_id: str, activity: str) -> list[Attempt]:
        """How each scheduling of `activity` in the job's history ended, and by which attempt."""

        async def history() -> list[Attempt]:
            client = await connect(self.settings)
            events = (await client.get_workflow_handle(job_id).fetch_history()).events
            scheduled = {
                e.event_id
                for e in events
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and e.activity_task_scheduled_event_attributes.activity_type.name == activity
            }
            started = {
                e.activity_task_started_event_attributes.scheduled_event_id: e
                for e in events
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            }
            ends = {
                EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "completed",
                EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "failed",
                EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "timed_out",
                EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "cancelled",
            }
            found = []
            for e in events:
                if e.event_type not in ends:
                    continue
                attrs = getattr(e, e.WhichOneof("attributes"))
                if attrs.scheduled_event_id not in scheduled:
                    continue
                start = started[attrs.scheduled_event_id].activity_task_started_event_attributes
                found.append(
                    Attempt(
                        start.attempt,
                        ends[e.event_type],
                        start.identity,
                        _reason(start.last_failure) if start.HasField("last_failure") else "",
                    )
                )
            return found

        return asyncio.run(history())

    def headers(self, company: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.settings, company)}"}

    def job(self, company: str, job_id: str) -> dict[str, object]:
        r = httpx.get(
            f"{self.api_url}/api/ai/jobs/{job_id}", headers=self.headers(company), timeout=30
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait_for(self, company: str, job_id: str, timeout_s: float = 600) -> dict[str, object]:
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
    # Keys of this test only: another session's fault tests may share the database.
    prefix = f"bull-{secrets.token_hex(4)}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_ui_port=free_port(),
        api_port=free_port(),
        redis_url=redis_url,
        redis_prefix=prefix,
        jwt_secret=secrets.token_urlsafe(32),  # no secret is built in
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
        "REDIS_PREFIX": prefix,
        "WORKER_METRICS_PORT": "0",  # no clash with another worker's metrics port
        "JWT_SECRET": settings.jwt_secret,
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
        keys = redis.Redis.from_url(redis_url)
        for key in keys.scan_iter(f"{prefix}:*"):
            keys.delete(key)


def _reason(failure: Failure) -> str:
    if failure.HasField("timeout_failure_info"):
        kind = TimeoutType.Name(failure.timeout_failure_info.timeout_type)
        return kind.removeprefix("TIMEOUT_TYPE_").lower().replace("_", "-") + " timeout"
    return failure.message


__all__ = ["Attempt", "Cluster", "Running", "seed_tenant"]
