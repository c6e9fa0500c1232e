"""Bull's job options and queue control, carried out by Temporal, seen through the mirror."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType

from jobs.bull import get_training_queue
from jobs.read import job_from_temporal
from jobs.service import JobService
from tenanttune.settings import Settings, TenantLimits
from tenanttune.temporal import job_search_attributes
from tenanttune.types import TrainRequest
from tests.conftest import REPO, seed_tenant, token, training_processes
from tests.integration.jobs import FAST, follow
from workflows.training import TrainingWorkflow

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]
ONE = {**FAST, "epochs": 1}
Q = "model-training"


async def submit(
    api: httpx.AsyncClient, settings: Settings, company: str, body: dict[str, Any], **headers: str
) -> str:
    r = await api.post(
        f"/api/ai/models/{company}/train",
        json=body,
        headers={**token(settings, company), **headers},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["jobId"])


async def state_of(api: httpx.AsyncClient, settings: Settings, company: str, job: str) -> Any:
    return (await api.get(f"/api/ai/jobs/{job}", headers=token(settings, company))).json()


async def test_delay_holds_the_job_then_runs_it(
    api: httpx.AsyncClient, settings: Settings, redis_client: aioredis.Redis, temporal_env: Any
) -> None:
    seed_tenant(settings, "later", lines=40)
    job = await submit(api, settings, "later", {**ONE, "delay": 4000})
    first = await state_of(api, settings, "later", job)
    assert first["state"] == "delayed"
    assert await redis_client.zscore(f"bull:{Q}:delayed", job) is not None
    # Temporal says the same without the mirror.
    from_temporal = await job_from_temporal(temporal_env.client, Q, job, settings)
    assert from_temporal is not None and from_temporal.state == "delayed"
    final = (await follow(api, job, token(settings, "later")))[-1]
    assert final["state"] == "completed"
    assert final["processedOn"] - final["timestamp"] >= 3500, final


async def test_priority_comes_from_the_plan_and_reaches_temporal(
    api: httpx.AsyncClient,
    settings: Settings,
    temporal_env: Any,
    redis_client: aioredis.Redis,
    plan_limits: dict[str, TenantLimits],
) -> None:
    seed_tenant(settings, "vip", lines=40)
    plan_limits["vip"] = TenantLimits(priority=1)
    client = temporal_env.client
    before = (await client.count_workflows("CompanyId='vip'")).count
    # A tenant cannot put itself ahead of the others.
    r = await api.post(
        "/api/ai/models/vip/train", json={**ONE, "priority": 1}, headers=token(settings, "vip")
    )
    assert r.status_code == 403 and "plan" in r.json()["detail"], r.text
    assert (await client.count_workflows("CompanyId='vip'")).count == before
    job = await submit(api, settings, "vip", ONE)
    desc = await client.get_workflow_handle(job).describe()
    assert desc.raw_description.workflow_execution_info.priority.priority_key == 1
    assert await redis_client.hget(f"bull:{Q}:{job}", "priority") == "1"
    # An admin may set one job's priority.
    admin = token(settings, "ops", admin=True)
    r = await api.post("/api/ai/models/vip/train", json={**ONE, "priority": 2}, headers=admin)
    assert r.status_code == 202, r.text
    second = r.json()["jobId"]
    desc = await client.get_workflow_handle(second).describe()
    assert desc.raw_description.workflow_execution_info.priority.priority_key == 2
    await follow(api, job, token(settings, "vip"))
    await follow(api, second, token(settings, "vip"))


async def test_pause_holds_new_jobs_and_resume_releases_them_in_order(
    api: httpx.AsyncClient, settings: Settings, redis_client: aioredis.Redis, temporal_env: Any
) -> None:
    seed_tenant(settings, "paused", lines=40)
    admin = token(settings, "ops", admin=True)
    assert (
        await api.post(f"/api/ai/queues/{Q}/pause", headers=token(settings, "paused"))
    ).status_code == 403
    assert (await api.post(f"/api/ai/queues/{Q}/pause", headers=admin)).json()["paused"]
    try:
        jobs = [await submit(api, settings, "paused", ONE) for _ in range(2)]
        deadline = time.monotonic() + 30
        while [(await state_of(api, settings, "paused", j))["state"] for j in jobs] != [
            "paused"
        ] * 2:
            assert time.monotonic() < deadline, "jobs did not show paused"
            await asyncio.sleep(0.2)
        assert await redis_client.lpos(f"bull:{Q}:paused", jobs[0]) is not None
        await asyncio.sleep(2)
        assert not training_processes(), "a paused queue started training"
        assert [(await state_of(api, settings, "paused", j))["state"] for j in jobs] == [
            "paused"
        ] * 2
    finally:
        r = await api.post(f"/api/ai/queues/{Q}/resume", headers=admin)
        assert r.status_code == 200 and not r.json()["paused"]
    finals = [(await follow(api, j, token(settings, "paused")))[-1] for j in jobs]
    assert [f["state"] for f in finals] == ["completed", "completed"]
    released = []
    for j in jobs:
        history = await temporal_env.client.get_workflow_handle(j).fetch_history()
        signals = [
            e
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
        assert signals, "the held job was released by a signal"
        released.append(signals[0].event_time.ToNanoseconds())
    assert released == sorted(released), "released oldest first"


async def test_retry_runs_a_failed_job_again_under_the_same_id(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    client = temporal_env.client
    job = "train-retry-000000000000000a"
    await client.start_workflow(
        TrainingWorkflow.run,
        TrainRequest(job_id=job, company_id="retry"),
        id=job,
        task_queue=Q,
        search_attributes=job_search_attributes("retry", "training"),
    )
    headers = token(settings, "retry")
    failed = (await follow(api, job, headers))[-1]
    assert failed["state"] == "failed" and failed["attemptsMade"] == 1
    assert (
        await api.post(f"/api/ai/jobs/{job}/retry", headers=token(settings, "other"))
    ).status_code == 404
    seed_tenant(settings, "retry", lines=40)  # the data is fixed; try again
    r = await api.post(f"/api/ai/jobs/{job}/retry", headers=headers)
    assert r.status_code == 202, r.text
    final = (await follow(api, job, headers))[-1]
    assert final["state"] == "completed" and final["attemptsMade"] == 2
    from_temporal = await job_from_temporal(client, Q, job, settings)
    assert from_temporal is not None and from_temporal.attemptsMade == 2
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{job}'")]
    assert len(runs) == 2
    again = await api.post(f"/api/ai/jobs/{job}/retry", headers=headers)
    assert again.status_code == 409 and "only failed jobs" in again.json()["detail"]


async def test_cancel_through_the_api(api: httpx.AsyncClient, settings: Settings) -> None:
    seed_tenant(settings, "stopper", lines=200)
    headers = token(settings, "stopper")
    job = await submit(api, settings, "stopper", {**FAST, "epochs": 20})
    deadline = time.monotonic() + 120
    while (await state_of(api, settings, "stopper", job))["progress"] <= 6:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    r = await api.post(f"/api/ai/jobs/{job}/cancel", headers=headers)
    assert r.status_code == 202
    t0 = time.monotonic()
    while training_processes():
        assert time.monotonic() - t0 < 20, "training kept running after cancel"
        await asyncio.sleep(0.2)
    final = (await follow(api, job, headers))[-1]
    assert final["state"] == "failed" and "cancelled" in final["failedReason"]
    assert (await api.post(f"/api/ai/jobs/{job}/cancel", headers=headers)).status_code == 409


async def test_same_job_id_after_completion_starts_nothing(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    seed_tenant(settings, "once", lines=40)
    body = {**ONE, "jobId": "nightly-2026-11-28"}
    job = await submit(api, settings, "once", body)
    await follow(api, job, token(settings, "once"))
    assert await submit(api, settings, "once", body) == job
    runs = [w async for w in temporal_env.client.list_workflows(f"WorkflowId = '{job}'")]
    assert len(runs) == 1


async def test_remove_on_complete_forgets_the_mirror_entry_not_the_job(
    api: httpx.AsyncClient, settings: Settings, redis_client: aioredis.Redis
) -> None:
    seed_tenant(settings, "tidy", lines=40)
    job = await submit(api, settings, "tidy", {**ONE, "removeOnComplete": True})
    await follow(api, job, token(settings, "tidy"))
    assert not await redis_client.exists(f"bull:{Q}:{job}")
    assert await redis_client.zscore(f"bull:{Q}:completed", job) is None
    answer = await state_of(api, settings, "tidy", job)
    assert answer["state"] == "completed" and answer["source"] == "temporal"


async def test_redis_flush_mid_job_then_cache_rebuild(
    api: httpx.AsyncClient, settings: Settings, redis_client: aioredis.Redis, temporal_env: Any
) -> None:
    seed_tenant(settings, "flushed", lines=120)
    headers = token(settings, "flushed")
    job = await submit(api, settings, "flushed", {**FAST, "epochs": 3})
    deadline = time.monotonic() + 120
    while (await state_of(api, settings, "flushed", job))["state"] != "active":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await redis_client.flushdb()
    during = await state_of(api, settings, "flushed", job)
    assert during["state"] == "active" and during["source"] == "temporal"
    final = (await follow(api, job, headers))[-1]
    assert final["state"] == "completed"
    restored = await get_training_queue(settings).jobs.rebuild_cache()
    assert restored >= 1
    h = await redis_client.hgetall(f"bull:{Q}:{job}")
    assert h["companyId"] == "flushed"
    assert await redis_client.zscore(f"bull:{Q}:completed", job) is not None
    cached = await state_of(api, settings, "flushed", job)
    assert cached["source"] == "redis" and cached["state"] == "completed"
    assert cached["result"]["modelPath"] == final["result"]["modelPath"]
    # The mirror's counts agree with Temporal's after a rebuild.
    counts = (
        await api.get(f"/api/ai/queues/{Q}/counts", headers=token(settings, "ops", admin=True))
    ).json()
    completed = (
        await temporal_env.client.count_workflows(
            "JobKind='training' AND ExecutionStatus='Completed'"
        )
    ).count
    assert counts["completed"] == completed


async def test_list_a_tenants_jobs(api: httpx.AsyncClient, settings: Settings) -> None:
    seed_tenant(settings, "lister", lines=40)
    job = await submit(api, settings, "lister", ONE)
    await follow(api, job, token(settings, "lister"))
    r = await api.get(
        "/api/ai/models/lister/jobs?state=completed", headers=token(settings, "lister")
    )
    assert [j["jobId"] for j in r.json()] == [job]
    r = await api.get("/api/ai/models/lister/jobs", headers=token(settings, "someone"))
    assert r.status_code == 403


async def test_fallback_when_temporal_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    """The seed's answer with Temporal down; its command trains the same kind of model."""
    from api.app import create_app

    down = settings.model_copy(
        update={"temporal_address": "127.0.0.1:1", "models_dir": tmp_path / "models"}
    )
    seed_tenant(down, "offline", lines=40)
    app = create_app(down)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.post(
                "/api/ai/models/offline/train", json=ONE, headers=token(down, "offline")
            )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["message"] == "Training data prepared. Run fine-tuning service manually:"
    assert body["note"] == "Job queue unavailable. Use manual command above."
    assert Path(body["instructions"]["dataPath"]).exists()
    command = body["instructions"]["command"].replace("python ", f"{sys.executable} ")
    done = subprocess.run(
        command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (out,) = (tmp_path / "models" / "offline").iterdir()
    assert (out / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == metrics["total_steps"] > 0


async def test_python_facade_reads_like_bull(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    """The seed's snippet, through `get_training_queue()` (Redis first, Temporal behind it)."""
    from jobs.bull import Queue

    seed_tenant(settings, "facade", lines=40)
    job_id = await submit(api, settings, "facade", ONE)
    mirror = get_training_queue(settings).jobs.mirror

    async def client() -> Any:
        return temporal_env.client

    queue = Queue(Q, JobService(settings, mirror, client))
    job = await queue.get_job(job_id)
    assert job is not None and job.id == job_id
    assert await job.get_state() in ("waiting", "active", "completed")
    result = await job.finished(timeout_s=240)
    assert result["modelPath"] == job_id
    assert await job.get_state() == "completed" and await job.progress() == 100
    counts = await queue.get_job_counts()
    assert counts["completed"] >= 1 and set(counts) == {
        "waiting",
        "active",
        "paused",
        "delayed",
        "completed",
        "failed",
    }
    assert await queue.get_job("deploy-facade-0000000000000000") is None  # other queue
    assert [j.jobId for j in await queue.get_jobs("facade")] == [job_id]


async def test_cancel_of_a_delayed_job_is_not_lost(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    """The cancel lands before the job's first step: it must end cancelled, never train."""
    seed_tenant(settings, "nevermind", lines=40)
    headers = token(settings, "nevermind")
    job = await submit(api, settings, "nevermind", {**ONE, "delay": 2000})
    assert (await api.post(f"/api/ai/jobs/{job}/cancel", headers=headers)).status_code == 202
    final = (await follow(api, job, headers, timeout_s=60))[-1]
    assert final["state"] == "failed" and "cancelled" in final["failedReason"]
    assert not (settings.models_dir / "nevermind").exists(), "a cancelled job trained anyway"
