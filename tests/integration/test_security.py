"""Tenants are mutually untrusted: every route × every bad caller, quotas, rate limits, caps.

Real Temporal, real Redis, the real app. "Nothing changed" means: no workflow started for
either tenant, no file written in their data or model dirs, the mirror's collections, counters
and the victim's job exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
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
from api.app import create_app
from tenanttune.mirror import COLLECTIONS, JobMirror
from tenanttune.settings import QUEUES, Settings, TenantLimits
from tenanttune.types import TrainingHyperparameters, TrainModelRequest
from tests.conftest import EXAMPLES, chat_line, seed_tenant, token, training_processes
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
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
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
                got = await api.request(method.upper(), url, headers=headers, **kwargs)
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
    temporal_env: Any,
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
    for r in answers:
        if r.status_code == 202:
            await api.post(f"/api/ai/jobs/{r.json()['jobId']}/cancel", headers=headers)


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


async def test_rate_limit_is_per_token_and_says_when_to_retry(
    api: httpx.AsyncClient, settings: Settings, limits: dict[str, TenantLimits]
) -> None:
    limits["chatty"] = TenantLimits(rate_limit_per_minute=5)
    headers = token(settings, "chatty")
    for _ in range(5):
        assert (await api.get("/api/ai/models/chatty/jobs", headers=headers)).status_code == 200
    r = await api.get("/api/ai/models/chatty/jobs", headers=headers)
    assert r.status_code == 429
    assert "5 requests per minute" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    other = token(settings, "chatty")  # another token (subject) of the same tenant
    assert (await api.get("/api/ai/models/chatty/jobs", headers=other)).status_code == 200


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
            TrainingActivities(capped, StatusActivities(mirror)).train_model,
            request("train-memcap-1"),
        )
    assert "memory limit of 1000 MB" in str(failed.value), failed.value
    assert failed.value.non_retryable and failed.value.type == "ResourceLimitError"
    assert not training_processes(containing="train-memcap-1")

    normal = capped.model_copy(update={"train_max_memory_mb": settings.train_max_memory_mb})
    done = await ActivityEnvironment().run(
        TrainingActivities(normal, StatusActivities(mirror)).train_model,
        request("train-memcap-2"),
    )
    assert done.metrics["steps"] > 0
    await mirror.close()
