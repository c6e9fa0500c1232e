"""Tenants are mutually untrusted: every route × every bad caller, quotas, rate limits, caps.

Real Temporal, real Redis, the real app. "Nothing changed" means: no workflow started for
either tenant, no file written in their data or model dirs, the mirror's collections, counters
and the victim's job exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import select
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.status import StatusActivities
from activities.training import TrainingActivities
from api import deps as api_deps
from api.app import create_app
from api.limits import client_key
from api.middleware import MULTIPART_ALLOWANCE
from api.routes import health as health_routes
from tenanttune.auth import PUBLISHED_SECRETS
from tenanttune.mirror import COLLECTIONS, JobMirror
from tenanttune.settings import QUEUES, Settings, TenantLimits
from tenanttune.types import TrainingHyperparameters, TrainModelRequest
from tests.conftest import (
    EXAMPLES,
    chat_line,
    free_port,
    seed_tenant,
    token,
    training_processes,
    wait_until_healthy,
)
from training import dataset

VICTIM, MALLORY = "victim", "mallory"
GOOD = {"epochs": 1, "batchSize": 8, "learningRate": 0.003}
HOUR_MS = 3_600_000
PUBLIC = {"/healthz", "/readyz"}


def bad_callers(settings: Settings) -> dict[str, dict[str, str]]:
    claims = {"sub": "x", "company_id": VICTIM, "role": "admin", "exp": int(time.time()) + 600}
    return {
        "no token": {},
        "expired token": token(settings, VICTIM, admin=True, ttl_s=-30),
        "alg none": {"Authorization": f"Bearer {jwt.encode(claims, None, algorithm='none')}"},
        "another key": {
            "Authorization": "Bearer "
            + jwt.encode(claims, "not-this-servers-secret-0123456789abcdef", algorithm="HS256")
        },
        "another tenant": token(settings, MALLORY),
        "tenant on admin route": token(settings, VICTIM),
    }


def expected_status(case: str, path: str) -> int | None:
    """What the caller must get; None where the case does not apply to this route."""
    admin_route = path.startswith("/api/ai/queues/")
    if case == "tenant on admin route":
        return 403 if admin_route else None
    if case == "another tenant":
        if admin_route:
            return 403
        return 404 if "{job_id}" in path else 403  # another tenant's job looks like no job
    return 401


def request_args(method: str, path: str, job_id: str) -> tuple[str, dict[str, Any]]:
    url = path.format(company_id=VICTIM, job_id=job_id, queue="model-training")
    kwargs: dict[str, Any] = {}
    if path.endswith("/train"):
        kwargs["json"] = GOOD
    elif path.endswith("/deploy"):
        kwargs["json"] = {"modelPath": "latest", "version": "1.0"}
    elif path.endswith("/clean"):
        kwargs["json"] = {"grace": 0, "limit": 0, "state": "completed"}
    elif path.startswith("/api/ai/datasets/"):
        kwargs["files"] = {"file": ("d.jsonl", (chat_line("q", "a") + "\n") * 20)}
    return url, kwargs


def fresh_address() -> str:
    """A client address no other test uses (failed authentications are counted per address)."""
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


@dataclass
class Served:
    """The app as it ships (production, the default) with its own copy of the settings."""

    app: Any
    settings: Settings

    def client(self, address: str | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(address or fresh_address(), 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://api")


@pytest.fixture(scope="module")
async def production(settings: Settings) -> AsyncIterator[Served]:
    prod = settings.model_copy(update={"environment": "production", "tenant_limits": {}})
    app = create_app(prod)
    async with app.router.lifespan_context(app):
        yield Served(app, prod)


async def snapshot(settings: Settings, client: Client, job_id: str) -> dict[str, Any]:
    r = aioredis.from_url(settings.redis_url, decode_responses=True)
    state: dict[str, Any] = {}
    try:
        for queue in QUEUES:
            key = f"{settings.redis_prefix}:{queue}"
            for name in COLLECTIONS.values():
                state[f"{queue}:{name}"] = sorted(
                    await r.lrange(f"{key}:{name}", 0, -1)
                    if name in ("wait", "active", "paused")
                    else await r.zrange(f"{key}:{name}", 0, -1)
                )
            state[f"{queue}:id"] = await r.get(f"{key}:id")
            for tenant in (VICTIM, MALLORY):
                state[f"{queue}:{tenant}"] = await r.zrange(f"{key}:company:{tenant}", 0, -1)
        state["victim job"] = await r.hgetall(f"{settings.redis_prefix}:model-training:{job_id}")
    finally:
        await r.aclose()
    for tenant in (VICTIM, MALLORY):
        for root in (settings.tenant_data_dir(tenant), settings.models_dir / tenant):
            state[str(root)] = sorted(
                (str(p), p.stat().st_mtime_ns) for p in root.rglob("*") if root.exists()
            )
        query = f"CompanyId = '{tenant}'"
        state[f"workflows of {tenant}"] = (await client.count_workflows(query)).count
    return state


async def test_every_route_refuses_every_bad_caller_and_changes_nothing(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any, production: Served
) -> None:
    seed_tenant(settings, VICTIM, lines=40)
    r = await api.post(
        f"/api/ai/models/{VICTIM}/train",
        json={**GOOD, "delay": HOUR_MS},  # a real job of the victim's, parked for an hour
        headers=token(settings, VICTIM),
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    client: Client = temporal_env.client
    while (await client.count_workflows(f"CompanyId = '{VICTIM}'")).count < 1:
        await asyncio.sleep(0.2)  # visibility has caught up: the snapshot is stable
    before = await snapshot(settings, client, job_id)

    spec = create_app(settings).openapi()
    checked: set[str] = set()
    for path, operations in spec["paths"].items():
        if path in PUBLIC:
            continue
        for method in operations:
            url, kwargs = request_args(method, path, job_id)
            for case, headers in bad_callers(settings).items():
                want = expected_status(case, path)
                if want is None:
                    continue
                # The app as it ships (production), each request from an address of its own:
                # the failed-authentication limit has a test of its own (F12, below).
                async with production.client() as hostile:
                    got = await hostile.request(method.upper(), url, headers=headers, **kwargs)
                assert got.status_code == want, f"{method.upper()} {path} [{case}]: {got.text}"
                assert got.json()["detail"], "every refusal says why"
                if want == 401:
                    assert got.headers["www-authenticate"] == "Bearer"
                checked.add(f"{method} {path}")
    documented = {f"{m} {p}" for p, ops in spec["paths"].items() if p not in PUBLIC for m in ops}
    assert checked == documented and len(documented) >= 14
    assert await snapshot(settings, client, job_id) == before

    admin = token(settings, "ops", admin=True)
    r = await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=admin)
    assert r.status_code == 202, r.text


async def test_listing_shows_only_the_callers_jobs(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    seed_tenant(settings, "lister", lines=20)
    r = await api.post(
        "/api/ai/models/lister/train",
        json={**GOOD, "delay": HOUR_MS},
        headers=token(settings, "lister"),
    )
    mine = r.json()["jobId"]
    listed = await api.get("/api/ai/models/lister/jobs", headers=token(settings, "lister"))
    jobs = listed.json()
    assert mine in [j["jobId"] for j in jobs] and all(j["companyId"] == "lister" for j in jobs)
    await api.post(f"/api/ai/jobs/{mine}/cancel", headers=token(settings, "lister"))


@pytest.fixture
def limits(settings: Settings) -> Iterator[dict[str, TenantLimits]]:
    """Per-tenant limits for one test (the live app reads these settings); cleared after it."""
    settings.tenant_limits = {}
    yield settings.tenant_limits
    settings.tenant_limits = {}


async def test_tenant_job_quotas_answer_429_with_retry_after(
    api: httpx.AsyncClient,
    settings: Settings,
    worker: None,
    limits: dict[str, TenantLimits],
) -> None:
    company = "quota"
    seed_tenant(settings, company, lines=40)
    headers = token(settings, company)
    limits[company] = TenantLimits(max_queued_jobs=2, max_running_jobs=1)
    started: list[str] = []
    try:
        for key in ("q1", "q2"):
            r = await api.post(
                f"/api/ai/models/{company}/train",
                json={**GOOD, "delay": HOUR_MS, "jobId": key},
                headers=headers,
            )
            assert r.status_code == 202, r.text
            started.append(r.json()["jobId"])
        r = await api.post(f"/api/ai/models/{company}/train", json=GOOD, headers=headers)
        assert r.status_code == 429, r.text
        assert "2 jobs waiting" in r.json()["detail"]
        assert "TENANT_MAX_QUEUED_JOBS" in r.json()["detail"]
        assert int(r.headers["retry-after"]) == settings.quota_retry_after_s
        # The same jobId again is the same job, not a new one: the quota does not apply.
        again = await api.post(
            f"/api/ai/models/{company}/train",
            json={**GOOD, "delay": HOUR_MS, "jobId": "q1"},
            headers=headers,
        )
        assert again.status_code == 202 and again.json()["jobId"] == started[0], again.text

        for job_id in started:
            await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=headers)
        await _until(api, started, headers, {"failed"})
        # Entries whose end never reached the mirror (a terminated run, a missing one) do not
        # lock the tenant out: they are checked against Temporal before a refusal.
        r_client = aioredis.from_url(settings.redis_url, decode_responses=True)
        open_key = f"{settings.redis_prefix}:model-training:company:{company}:open"
        await r_client.sadd(open_key, started[0], f"train-{company}-neverstarted")
        await r_client.aclose()
        # One running job reaches the running limit.
        r = await api.post(
            f"/api/ai/models/{company}/train", json={**GOOD, "epochs": 5}, headers=headers
        )
        assert r.status_code == 202, r.text
        running = r.json()["jobId"]
        started.append(running)
        await _until(api, [running], headers, {"active"})
        r = await api.post(f"/api/ai/models/{company}/train", json=GOOD, headers=headers)
        assert r.status_code == 429, r.text
        assert "1 jobs running" in r.json()["detail"]
        assert "TENANT_MAX_RUNNING_JOBS" in r.json()["detail"]
    finally:
        for job_id in started:
            await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=headers)
        await _until(api, started, headers, {"failed", "completed"})


async def test_simultaneous_submissions_cannot_slip_past_the_quota(
    api: httpx.AsyncClient,
    settings: Settings,
    worker: None,  # carries out the cancellations that clean up after it
    limits: dict[str, TenantLimits],
) -> None:
    company = "rush"
    seed_tenant(settings, company, lines=40)
    headers = token(settings, company)
    limits[company] = TenantLimits(max_queued_jobs=2)
    answers = await asyncio.gather(
        *(
            api.post(
                f"/api/ai/models/{company}/train",
                json={**GOOD, "delay": HOUR_MS},
                headers=headers,
            )
            for _ in range(10)
        )
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [202, 202] + [429] * 8, codes
    started = [r.json()["jobId"] for r in answers if r.status_code == 202]
    for job_id in started:
        await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=headers)
    await _until(api, started, headers, {"failed"})  # settled: later snapshots stay still


async def _until(
    api: httpx.AsyncClient, job_ids: list[str], headers: dict[str, str], states: set[str]
) -> None:
    deadline = time.monotonic() + 120
    for job_id in job_ids:
        while (await api.get(f"/api/ai/jobs/{job_id}", headers=headers)).json()[
            "state"
        ] not in states:
            assert time.monotonic() < deadline, f"{job_id} never reached {states}"
            await asyncio.sleep(0.2)


async def test_rate_limit_is_per_tenant_whatever_token_it_uses(
    production: Served, temporal_env: Any
) -> None:
    """F12: three tokens of one tenant share its budget (no more requests by minting more);
    another tenant's budget is untouched; the refusal says when to retry."""
    chatty = f"chatty-{secrets.token_hex(3)}"
    s = production.settings
    s.tenant_limits = {chatty: TenantLimits(rate_limit_per_minute=5)}
    before = await snapshot(s, temporal_env.client, "none")
    try:
        tokens = [token(s, chatty) for _ in range(3)]
        async with production.client() as client:
            codes = [
                (await client.get(f"/api/ai/models/{chatty}/jobs", headers=tokens[i % 3]))
                for i in range(8)
            ]
            assert [r.status_code for r in codes] == [200] * 5 + [429] * 3, codes[-1].text
            refused = codes[-1]
            assert f"5 requests per minute for tenant '{chatty}'" in refused.json()["detail"]
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            fresh = token(s, chatty)  # a token minted now changes nothing
            r = await client.get(f"/api/ai/models/{chatty}/jobs", headers=fresh)
            assert r.status_code == 429
            r = await client.get(f"/api/ai/models/{VICTIM}/jobs", headers=token(s, VICTIM))
            assert r.status_code == 200, r.text
    finally:
        s.tenant_limits = {}
    assert await snapshot(s, temporal_env.client, "none") == before


async def test_with_redis_down_reads_pass_and_writes_are_refused(
    settings: Settings, temporal_env: Any
) -> None:
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    seed_tenant(down, "offline", lines=20)
    app = create_app(down)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = token(down, "offline")
            r = await client.get("/api/ai/models/offline/jobs", headers=headers)
            assert r.status_code == 200, r.text  # fail open: answered from Temporal
            r = await client.post("/api/ai/models/offline/train", json=GOOD, headers=headers)
            assert r.status_code == 503, r.text  # fail closed
            assert "rate limiter" in r.json()["detail"] and r.headers["retry-after"]
    assert (await temporal_env.client.count_workflows("CompanyId = 'offline'")).count == 0


async def test_upload_line_limits_are_413_and_store_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    headers = token(settings, "uploads")
    long_line = chat_line("q", "a" * (dataset.MAX_LINE_BYTES + 10)) + "\n"
    r = await api.post(
        "/api/ai/datasets/uploads", headers=headers, files={"file": ("l.jsonl", long_line)}
    )
    assert r.status_code == 413 and "line 1 is longer than" in r.json()["detail"]
    settings.max_upload_lines = 10
    try:
        many = (chat_line("q", "a") + "\n") * 11
        r = await api.post(
            "/api/ai/datasets/uploads", headers=headers, files={"file": ("m.jsonl", many)}
        )
        assert r.status_code == 413 and "more than 10 lines" in r.json()["detail"]
    finally:
        settings.max_upload_lines = 200_000
    assert not any(settings.tenant_data_dir("uploads").iterdir())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"maxSeqLength": 4096}, "TRAIN_MAX_SEQ_LEN_LIMIT"),
        ({"epochs": 50, "maxSeqLength": 2048}, "TRAIN_MAX_TOKEN_BUDGET"),
        ({"baseModel": "https://evil.example/model"}, "ALLOWED_BASE_MODELS"),
        ({"baseModel": "/etc"}, "ALLOWED_BASE_MODELS"),
    ],
)
async def test_training_caps_refuse_before_anything_runs(
    api: httpx.AsyncClient, settings: Settings, body: dict[str, Any], message: str
) -> None:
    seed_tenant(settings, "capped", lines=120)
    old_budget = settings.train_max_token_budget
    settings.train_max_token_budget = 100_000
    try:
        r = await api.post(
            "/api/ai/models/capped/train", json={**GOOD, **body}, headers=token(settings, "capped")
        )
    finally:
        settings.train_max_token_budget = old_budget
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


async def test_training_over_its_memory_cap_fails_clearly(
    settings: Settings, tiny_base: Path, tmp_path: Path
) -> None:
    """RLIMIT_AS on the training process: it fails with the limit named, not retried, and
    nothing is left running; the same activity with the normal cap trains."""
    _, examples = dataset.analyze(sorted((EXAMPLES / "acme").glob("*.jsonl")), 4000)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"messages": e.messages}) + "\n" for e in examples[:40]))
    val.write_text("".join(json.dumps({"messages": e.messages}) + "\n" for e in examples[40:48]))
    mirror = JobMirror.from_url(settings.redis_url, "memcap")

    def request(job_id: str) -> TrainModelRequest:
        return TrainModelRequest(
            job_id=job_id,
            company_id="memcap",
            train_path=str(train),
            validation_path=str(val),
            base_model="",
            hyperparameters=TrainingHyperparameters(epochs=1, batch_size=8),
        )

    capped = settings.model_copy(
        update={"state_dir": tmp_path / "state", "train_max_memory_mb": 1000}
    )
    capped.tiny_base_dir.parent.mkdir(parents=True)
    capped.tiny_base_dir.symlink_to(tiny_base)
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(
            TrainingActivities(capped, StatusActivities(mirror, settings)).train_model,
            request("train-memcap-1"),
        )
    assert "memory limit of 1000 MB" in str(failed.value), failed.value
    assert failed.value.non_retryable and failed.value.type == "ResourceLimitError"
    assert not training_processes(containing="train-memcap-1")

    normal = capped.model_copy(update={"train_max_memory_mb": settings.train_max_memory_mb})
    done = await ActivityEnvironment().run(
        TrainingActivities(normal, StatusActivities(mirror, settings)).train_model,
        request("train-memcap-2"),
    )
    assert done.metrics["steps"] > 0
    await mirror.close()


# --- the hostile-tenant review (issue 13): one test per finding, README "Security" ----------

MIB = 1024 * 1024
BOUNDARY = "hostile-boundary"


class StreamedBody:
    """A request body sent without Content-Length (chunked), produced only as the server asks
    for it; `taken` is how many bytes the server pulled."""

    def __init__(self, total: int, head: bytes = b"", fill: bytes = b"x", chunk: int = MIB) -> None:
        self.total, self.head, self.fill, self.chunk = total, head, fill, chunk
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.head:
            self.taken += len(self.head)
            yield self.head
        piece = (self.fill * (self.chunk // len(self.fill) + 1))[: self.chunk]
        while self.taken < self.total:
            self.taken += len(piece)
            yield piece


def upload_body(total: int) -> StreamedBody:
    """A multipart upload of one endless JSONL file, as `curl -F file=@big.jsonl` sends it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return StreamedBody(total, head, fill=(chat_line("q", "a") + "\n").encode())


UPLOAD = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def spool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where the form parser would spool uploaded files (the system temp dir, watched)."""
    path = tmp_path / "spool"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


async def test_anonymous_chunked_upload_is_refused_before_a_byte_is_read(
    production: Served, settings: Settings, temporal_env: Any, spool: Path
) -> None:
    """F2: 200 MiB chunked (no Content-Length) to the upload route by callers without a valid
    token: 401 having read nothing, nothing spooled or stored, nothing of anyone changed."""
    seed_tenant(settings, VICTIM, lines=40)
    before = await snapshot(settings, temporal_env.client, "none")
    for case, headers in bad_callers(settings).items():
        if expected_status(case, "/api/ai/datasets/{company_id}") != 401:
            continue
        body = upload_body(200 * MIB)
        async with production.client() as client:
            r = await client.post(
                f"/api/ai/datasets/{VICTIM}", content=body, headers={**UPLOAD, **headers}
            )
        assert r.status_code == 401, f"{case}: {r.text}"
        assert r.headers["www-authenticate"] == "Bearer"
        assert body.taken == 0, f"{case}: the server read {body.taken} bytes before refusing"
    assert list(spool.iterdir()) == []
    assert await snapshot(settings, temporal_env.client, "none") == before


async def test_oversized_chunked_upload_is_413_while_it_streams(
    production: Served, settings: Settings, temporal_env: Any, spool: Path
) -> None:
    """F2: a tenant's own upload past MAX_UPLOAD_BYTES, chunked or declared: 413 naming the limit
    once the limit (plus multipart framing) is passed, not after 200 MiB; nothing stored."""
    seed_tenant(settings, VICTIM, lines=40)
    seed_tenant(settings, MALLORY, lines=40)
    before = await snapshot(settings, temporal_env.client, "none")
    limit = production.settings.max_upload_bytes + MULTIPART_ALLOWANCE
    headers = {**UPLOAD, **token(settings, MALLORY)}
    body = upload_body(200 * MIB)
    async with production.client() as client:
        r = await client.post(f"/api/ai/datasets/{MALLORY}", content=body, headers=headers)
        assert r.status_code == 413, r.text
        assert "MAX_UPLOAD_BYTES" in r.json()["detail"]
        assert str(production.settings.max_upload_bytes) in r.json()["detail"]
        assert body.taken <= limit + MIB, f"read {body.taken} bytes of an over-limit upload"
        # Declared too large: refused from the header, nothing read at all.
        declared = upload_body(200 * MIB)
        r = await client.post(
            f"/api/ai/datasets/{MALLORY}",
            content=declared,
            headers={**headers, "Content-Length": str(200 * MIB)},
        )
        assert r.status_code == 413 and declared.taken == 0, r.text
    assert list(spool.iterdir()) == []
    assert await snapshot(settings, temporal_env.client, "none") == before


@pytest.fixture(scope="module")
def served(production: Served) -> Iterator[int]:
    """The production app behind a real uvicorn on a free port (real sockets, real buffers)."""
    import uvicorn

    port = free_port()
    app = create_app(production.settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until_healthy(
        f"http://127.0.0.1:{port}", lambda: None if thread.is_alive() else "the API thread exited"
    )
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def send_until_answered(port: int, head: str, piece: bytes, total: int) -> tuple[int, str, int]:
    """Send the request head, then body pieces until the server answers (or `total` is sent).

    Returns (status, response text, body bytes sent before the answer came). The first piece
    waits two seconds: a server that answers from the headers alone answers with 0 sent.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        sent, wait = 0, 2.0
        while not select.select([sock], [], [], wait)[0] and sent < total:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server answered and closed: read the answer
            sent += len(piece)
            wait = 0.01
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, f"no answer after {sent} body bytes"
            answer += data
        head_part, _, rest = answer.partition(b"\r\n\r\n")
        lines = head_part.decode().split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(lines[0].split()[1]), head_part.decode() + "\n" + rest.decode(), sent


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_anonymous_json_flood_is_401_unread_and_healthz_stays_responsive(
    served: int, production: Served, settings: Settings, temporal_env: Any
) -> None:
    """F3: 20 MiB JSON arrays to /train by strangers, declared and chunked, 16 at a time over
    real sockets: each is answered 401 from its headers alone (no body byte sent), /healthz
    answers throughout; a tenant's own 20 MiB JSON is 413 after MAX_JSON_BODY_BYTES."""
    before = await snapshot(settings, temporal_env.client, "none")
    piece = b"[" + b"1," * (32 * 1024)
    path = f"/api/ai/models/{VICTIM}/train"
    declared = (
        f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        f"Content-Length: {20 * MIB}\r\n\r\n"
    )
    chunked = (
        f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    # Each from a client of its own, as a load balancer reports it (uvicorn trusts 127.0.0.1's
    # X-Forwarded-For): the per-address failure limit has a test of its own.
    floods = [
        (head.replace("\r\n\r\n", f"\r\nX-Forwarded-For: {fresh_address()}\r\n\r\n"), body)
        for head, body in [(declared, piece), (chunked, chunk(piece))] * 8
    ]
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{served}", timeout=10) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    async def probes(at_least: int) -> None:
        deadline = time.monotonic() + 60
        while len(latencies) < at_least:
            assert prober.is_alive() and time.monotonic() < deadline, "/healthz did not answer"
            await asyncio.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        await probes(1)
        answers = await asyncio.gather(
            *(
                asyncio.to_thread(send_until_answered, served, head, body, 20 * MIB)
                for head, body in floods
            )
        )
        await probes(len(latencies) + 3)
    finally:
        stop.set()
        prober.join()
    for status, text, sent in answers:
        assert status == 401, text
        assert "www-authenticate: bearer" in text.lower()
        assert sent == 0, f"{sent} body bytes were taken before the 401"
    # Parsing even one of these bodies stalled /healthz 1-3 s; sixteen would take far longer.
    assert max(latencies) < 1.5, f"/healthz stalled: {max(latencies):.2f} s"

    # The tenant's own oversized JSON: refused once MAX_JSON_BODY_BYTES is passed.
    limit = production.settings.max_json_body_bytes
    authorized = chunked.replace(
        "\r\n\r\n", f"\r\nAuthorization: {token(settings, VICTIM)['Authorization']}\r\n\r\n"
    )
    status, text, sent = await asyncio.to_thread(
        send_until_answered, served, authorized, chunk(piece), 20 * MIB
    )
    assert status == 413 and "MAX_JSON_BODY_BYTES" in text, text
    assert sent < 20 * MIB // 2, f"{sent} bytes were taken of a body over a {limit} byte limit"
    body = StreamedBody(20 * MIB, fill=b"1,", chunk=64 * 1024)
    async with production.client() as client:
        r = await client.post(path, content=body, headers=token(settings, VICTIM))
    assert r.status_code == 413 and body.taken <= limit + 64 * 1024, (r.text, body.taken)
    assert await snapshot(settings, temporal_env.client, "none") == before


async def test_production_is_the_default_and_closes_docs_metrics_and_the_old_secret(
    production: Served, api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    """F9: as shipped (no ENVIRONMENT), /docs, /redoc, /openapi.json are gone and /metrics needs
    METRICS_TOKEN; a token signed with the secret that used to be in the source is a 401."""
    assert Settings(_env_file=None).environment == "production"  # type: ignore[call-arg]
    seed_tenant(settings, VICTIM, lines=40)
    before = await snapshot(settings, temporal_env.client, "none")
    async with production.client() as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(path)).status_code == 404, path
        r = await client.get("/metrics")
        assert r.status_code == 403 and "METRICS_TOKEN" in r.json()["detail"]
        claims = {"sub": "x", "company_id": VICTIM, "role": "admin", "exp": int(time.time()) + 600}
        for published in PUBLISHED_SECRETS:
            forged = {"Authorization": f"Bearer {jwt.encode(claims, published, 'HS256')}"}
            r = await client.post(f"/api/ai/models/{VICTIM}/train", json=GOOD, headers=forged)
            assert r.status_code == 401 and "signature" in r.json()["detail"], r.text
            r = await client.post("/api/ai/queues/model-training/pause", headers=forged)
            assert r.status_code == 401, r.text
    # Development only when asked for (the session's fixture asks): the docs are there.
    assert (await api.get("/docs")).status_code == 200
    assert await snapshot(settings, temporal_env.client, "none") == before


async def test_readyz_is_cached_shared_and_its_detail_is_admin_only(
    settings: Settings, temporal_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F11: 32 anonymous /readyz at once cost one readiness check (Temporal calls), later ones
    within READYZ_CACHE_S none; strangers and tenants get the status alone, admins the detail
    (addresses, pollers' pid@host, hints); a bad token is a 401."""
    checks = 0
    real = health_routes._check_readiness

    async def counted(request: Any) -> Any:
        nonlocal checks
        checks += 1
        return await real(request)

    monkeypatch.setattr(health_routes, "_check_readiness", counted)
    prod = settings.model_copy(update={"environment": "production", "readyz_cache_s": 1.0})
    app = create_app(prod)
    async with app.router.lifespan_context(app):
        served = Served(app, prod)
        async with served.client() as client:
            answers = await asyncio.gather(*(client.get("/readyz") for _ in range(32)))
            answers += [await client.get("/readyz") for _ in range(32)]
            assert checks == 1
            assert len({(r.status_code, r.text) for r in answers}) == 1
            r = answers[0]
            assert set(r.json()) == {"status"} and r.json()["status"] in (
                "ready",
                "degraded",
                "unavailable",
            )
            assert prod.temporal_address not in r.text and socket.gethostname() not in r.text
            tenant = await client.get("/readyz", headers=token(settings, MALLORY))
            assert tenant.json() == r.json()
            admin = await client.get("/readyz", headers=token(settings, "ops", admin=True))
            detail = admin.json()
            assert detail["status"] == r.json()["status"] and admin.status_code == r.status_code
            assert detail["checks"]["temporal"]["address"] == prod.temporal_address
            assert "queue:model-training" in detail["checks"]
            bad = await client.get("/readyz", headers={"Authorization": "Bearer nonsense"})
            assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
            assert checks == 1
            deadline = time.monotonic() + 10
            while checks == 1:  # the cached answer expires: one new check, shared again
                assert time.monotonic() < deadline, "the readiness cache never expired"
                await asyncio.gather(*(client.get("/readyz") for _ in range(8)))
                await asyncio.sleep(0.1)
            assert checks == 2


async def test_failed_authentications_are_limited_per_address(
    production: Served,
    settings: Settings,
    temporal_env: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F12: past AUTH_FAILURES_PER_MINUTE bad or missing tokens, an address gets 429 with
    Retry-After and its tokens are not even decoded until then; other addresses (and an IPv6
    host's whole /64 as one) are counted apart; nothing of anyone changes."""
    decoded = 0
    real = api_deps.decode_token

    def counted(*args: Any) -> Any:
        nonlocal decoded
        decoded += 1
        return real(*args)

    monkeypatch.setattr(api_deps, "decode_token", counted)
    monkeypatch.setattr(production.settings, "auth_failures_per_minute", 5)
    seed_tenant(settings, VICTIM, lines=40)
    before = await snapshot(settings, temporal_env.client, "none")
    wrong = bad_callers(settings)["another key"]
    good = token(settings, VICTIM)
    url = f"/api/ai/models/{VICTIM}/jobs"
    async with production.client() as attacker, production.client() as neighbour:
        codes = [(await attacker.get(url, headers=wrong)).status_code for _ in range(4)]
        codes.append((await attacker.post(f"/api/ai/models/{VICTIM}/train", json=GOOD)).status_code)
        assert codes == [401] * 5  # four wrongly signed, one without a token (middleware)
        refused = await attacker.get(url, headers=wrong)
        assert refused.status_code == 429, refused.text
        assert "AUTH_FAILURES_PER_MINUTE" in refused.json()["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        tried = decoded
        for headers in (wrong, wrong, good):
            r = await attacker.get(url, headers=headers)
            assert r.status_code == 429, r.text
        r = await attacker.post(f"/api/ai/models/{VICTIM}/train", json=GOOD, headers=good)
        assert r.status_code == 429, r.text
        assert decoded == tried, "tokens from a blocked address were decoded"
        assert (await neighbour.get(url, headers=good)).status_code == 200
        assert (await neighbour.get(url, headers=wrong)).status_code == 401
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.1.2.3") == client_key("10.1.2.3")
    assert await snapshot(settings, temporal_env.client, "none") == before


async def test_ids_and_tags_with_a_newline_are_refused_and_nothing_is_queued(
    production: Served, settings: Settings, temporal_env: Any
) -> None:
    """F13: `version: "m1\\n"`, `companyId: "mallory%0A"`, a jobId or job id with a newline:
    400/422 (or 404 for a job id), never a job, a file or another tenant's anything."""
    seed_tenant(settings, VICTIM, lines=40)
    seed_tenant(settings, MALLORY, lines=40)
    before = await snapshot(settings, temporal_env.client, "none")
    mine, admin = token(settings, MALLORY), token(settings, "ops", admin=True)
    train = f"/api/ai/models/{MALLORY}/train"
    async with production.client() as client:
        for field in ("version", "deployVersion", "jobId"):
            r = await client.post(train, json={**GOOD, field: "m1\n"}, headers=mine)
            assert r.status_code == 422 and field in r.json()["message"], r.text
        r = await client.post(
            f"/api/ai/models/{MALLORY}/deploy",
            json={"modelPath": "latest", "version": "m1\n"},
            headers=mine,
        )
        assert r.status_code == 400 and "version must be a valid model tag" in r.text, r.text
        for caller in (mine, admin):
            for action in ("train", "deploy", "jobs"):
                method = "GET" if action == "jobs" else "POST"
                body = {"modelPath": "latest", "version": "1"} if action == "deploy" else GOOD
                r = await client.request(
                    method,
                    f"/api/ai/models/{MALLORY}%0A/{action}",
                    json=None if method == "GET" else body,
                    headers=caller,
                )
                assert r.status_code == 400 and "companyId must be" in r.text, r.text
            r = await client.post(
                f"/api/ai/datasets/{MALLORY}%0A",
                files={"file": ("d.jsonl", (chat_line("q", "a") + "\n") * 20)},
                headers=caller,
            )
            assert r.status_code == 400, r.text
            r = await client.get(
                f"/api/ai/jobs/train-{MALLORY}-0123456789abcdef%0A", headers=caller
            )
            assert r.status_code == 404, r.text
    assert await snapshot(settings, temporal_env.client, "none") == before
