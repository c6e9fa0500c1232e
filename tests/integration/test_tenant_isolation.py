"""Hostile requests of one tenant against another or against the service (issue 13, F1, F4-F8,
F10, F15, F16): each sends the request, checks the answer, and checks that nothing of the
other tenant or the service changed. Real Temporal, Redis, worker and app."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from api.app import create_app
from tenanttune.settings import Settings, TenantLimits
from tests.conftest import chat_line, free_port, seed_tenant, token, wait_until_healthy
from tests.integration.jobs import FAST, follow
from training import tokens

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]
Q = "model-training"
ONE = {**FAST, "epochs": 1}
HOUR_MS = 3_600_000


async def submit(
    api: httpx.AsyncClient, settings: Settings, company: str, body: dict[str, Any], **kw: str
) -> httpx.Response:
    return await api.post(
        f"/api/ai/models/{company}/train", json=body, headers={**token(settings, company), **kw}
    )


async def mirror_of(redis: aioredis.Redis, company: str) -> dict[str, Any]:
    """Everything the mirror holds about one tenant's training jobs."""
    ids = await redis.zrange(f"bull:{Q}:company:{company}", 0, -1)
    return {
        "ids": ids,
        "hashes": {i: await redis.hgetall(f"bull:{Q}:{i}") for i in ids},
        "events": {i: await redis.xlen(f"bull:{Q}:{i}:events") for i in ids},
    }


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def plan(settings: Settings) -> Iterator[Settings]:
    """Settings a test may change (limits, budgets); restored after it."""
    saved = settings.model_dump()
    settings.tenant_limits = {}
    yield settings
    for name in (
        "tenant_limits",
        "train_max_token_budget",
        "event_stream_max_s",
        "tenant_max_event_streams",
    ):
        setattr(settings, name, saved[name])


async def test_f1_keep_n_of_one_tenant_leaves_the_other_tenants_jobs(
    api: httpx.AsyncClient, settings: Settings, redis_client: aioredis.Redis
) -> None:
    seed_tenant(settings, "keeper", lines=40)
    seed_tenant(settings, "trimmer", lines=40)
    keeper = token(settings, "keeper")
    done = []
    for _ in range(2):
        r = await submit(api, settings, "keeper", ONE)
        assert r.status_code == 202, r.text
        done.append((await follow(api, r.json()["jobId"], keeper))[-1])
    assert all(j["state"] == "completed" for j in done)
    before = await mirror_of(redis_client, "keeper")
    listed = (await api.get("/api/ai/models/keeper/jobs", headers=keeper)).json()

    for _ in range(2):
        r = await submit(api, settings, "trimmer", {**ONE, "removeOnComplete": 1})
        assert r.status_code == 202, r.text
        final = (await follow(api, r.json()["jobId"], token(settings, "trimmer")))[-1]
        assert final["state"] == "completed"

    assert await mirror_of(redis_client, "keeper") == before
    assert (await api.get("/api/ai/models/keeper/jobs", headers=keeper)).json() == listed
    # The tenant's own keep-1 held.
    mine = await redis_client.zrange(f"bull:{Q}:company:trimmer", 0, -1)
    assert len(mine) == 1


async def test_f4_data_uploaded_after_submission_is_checked_against_the_budget(
    api: httpx.AsyncClient, settings: Settings, plan: Settings, temporal_env: Any
) -> None:
    company = "grower"
    seed_tenant(settings, company, lines=30)
    base = settings.tiny_base_dir
    small = tokens.count(base, _conversations(settings, company), 256)
    plan.train_max_token_budget = small.tokens * 2  # room for one epoch of today's data
    r = await submit(api, settings, company, {**ONE, "delay": 3000})
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    # Three times the data lands before the job starts.
    more = settings.tenant_data_dir(company) / "more.jsonl"
    more.write_text(
        "".join(chat_line(f"question {i} " * 20, f"answer {i} " * 30) + "\n" for i in range(60))
    )
    final = (await follow(api, job_id, token(settings, company)))[-1]
    assert final["state"] == "failed", final
    assert "TRAIN_MAX_TOKEN_BUDGET" in final["failedReason"], final
    assert "grew since the job was queued" in final["failedReason"]
    assert final["attemptsMade"] == 1
    assert not (settings.models_dir / company).exists(), "the job trained anyway"
    # A retry checks again, on the data as it is now.
    r = await api.post(f"/api/ai/jobs/{job_id}/retry", headers=token(settings, company))
    assert r.status_code == 202, r.text
    again = (await follow(api, job_id, token(settings, company)))[-1]
    assert again["state"] == "failed" and "TRAIN_MAX_TOKEN_BUDGET" in again["failedReason"]
    more.unlink()


def _conversations(settings: Settings, company: str) -> list[Any]:
    from jobs.admission import analyze_tenant

    _, examples = analyze_tenant(settings, company)
    return [e.messages for e in examples]


async def test_f5_the_budget_counts_real_tokens_of_the_base_model(
    api: httpx.AsyncClient, settings: Settings, plan: Settings, temporal_env: Any
) -> None:
    """Emoji and CJK text is many tokens per character: a 4-characters-a-token estimate let
    such data through at several times the budget."""
    company = "emoji"
    target = settings.tenant_data_dir(company)
    target.mkdir(parents=True, exist_ok=True)
    question, answer = "号订单 🚚📦 在哪里？", "已发货 ✅ 🎉 预计明天送达 🙏"
    lines = [chat_line(f"请问 {i} {question}", answer) for i in range(40)]
    (target / "cjk.jsonl").write_text("\n".join(lines) + "\n")
    counted = tokens.count(settings.tiny_base_dir, _conversations(settings, company), 256)
    assert counted.exact
    chars = sum(len(f"请问 {i} {question}") + len(answer) for i in range(40))
    assert counted.tokens > 2 * (chars // 4), "the sample is not token-dense"
    plan.train_max_token_budget = counted.tokens - 1  # one token short, at one epoch
    before = (await temporal_env.client.count_workflows(f"CompanyId='{company}'")).count
    r = await submit(api, settings, company, ONE)
    assert r.status_code == 422, r.text
    assert f"{counted.tokens:,} tokens" in r.json()["detail"], r.text
    assert (await temporal_env.client.count_workflows(f"CompanyId='{company}'")).count == before
    plan.train_max_token_budget = counted.tokens
    r = await submit(api, settings, company, {**ONE, "delay": HOUR_MS})
    assert r.status_code == 202, r.text
    await api.post(f"/api/ai/jobs/{r.json()['jobId']}/cancel", headers=token(settings, company))


async def test_f6_concurrent_retries_cannot_pass_the_queued_quota_together(
    api: httpx.AsyncClient, settings: Settings, plan: Settings, temporal_env: Any
) -> None:
    company = "retrier"
    seed_tenant(settings, company, lines=40)
    headers = token(settings, company)
    admin = token(settings, "ops", admin=True)
    # Nothing may run meanwhile: jobs wait in a paused queue (counted as queued).
    assert (await api.post(f"/api/ai/queues/{Q}/pause", headers=admin)).status_code == 200
    failed = []
    for _ in range(6):
        r = await submit(api, settings, company, ONE)
        assert r.status_code == 202, r.text
        failed.append(r.json()["jobId"])
    for job_id in failed:
        assert (await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=headers)).status_code == 202
    for job_id in failed:
        assert (await follow(api, job_id, headers, timeout_s=60))[-1]["state"] == "failed"
    plan.tenant_limits[company] = TenantLimits(max_queued_jobs=2, max_running_jobs=1)
    try:
        answers = await asyncio.gather(
            *(api.post(f"/api/ai/jobs/{j}/retry", headers=headers) for j in failed)
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [202, 202, 429, 429, 429, 429], [a.text for a in answers]
        assert all(
            "TENANT_MAX_QUEUED_JOBS" in a.json()["detail"] for a in answers if a.status_code == 429
        )
        running = await temporal_env.client.count_workflows(
            f"CompanyId='{company}' AND ExecutionStatus='Running'"
        )
        assert running.count == 2
    finally:
        await api.post(f"/api/ai/queues/{Q}/resume", headers=admin)
        for job_id in failed:
            await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=headers)


async def test_f7_a_tenants_stored_data_is_capped(
    api: httpx.AsyncClient, settings: Settings, plan: Settings
) -> None:
    company, other = "hoarder", "neighbour"
    seed_tenant(settings, other, lines=20)
    theirs = files_of(settings.tenant_data_dir(other))
    plan.tenant_limits[company] = TenantLimits(max_data_bytes=60_000, max_data_files=2)
    headers = token(settings, company)
    line = chat_line("How do I export invoices?", "Open Billing, then Export. " * 10) + "\n"
    body = line * (40_000 // len(line))

    async def upload(name: str, text: str) -> httpx.Response:
        return await api.post(
            f"/api/ai/datasets/{company}", files={"file": (name, text)}, headers=headers
        )

    assert (await upload("a.jsonl", body)).status_code == 201
    r = await upload("b.jsonl", body)  # 80 kB in all: over the tenant's 60 kB
    assert r.status_code == 413 and "TENANT_MAX_DATA_BYTES" in r.json()["detail"], r.text
    assert sorted(files_of(settings.tenant_data_dir(company))) == ["a.jsonl"], "a part was kept"
    assert (await upload("a.jsonl", body)).status_code == 201, "replacing a file is not growth"
    assert (await upload("b.jsonl", line * 20)).status_code == 201
    r = await upload("c.jsonl", line * 20)
    assert r.status_code == 413 and "TENANT_MAX_DATA_FILES" in r.json()["detail"], r.text
    assert files_of(settings.tenant_data_dir(other)) == theirs


async def test_f7_a_refused_submission_does_not_read_the_data_again(
    api: httpx.AsyncClient, settings: Settings, plan: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import dataset

    company = "refused"
    seed_tenant(settings, company, lines=40)
    calls = []
    real = dataset.analyze
    monkeypatch.setattr(dataset, "analyze", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan.train_max_token_budget = 1
    for _ in range(3):
        r = await submit(api, settings, company, ONE)
        assert r.status_code == 422 and "TRAIN_MAX_TOKEN_BUDGET" in r.json()["detail"]
    assert len(calls) == 1, "the tenant's files were read again for an unchanged dataset"


@pytest.fixture(scope="module")
def served(settings: Settings, temporal_env: Any) -> Iterator[str]:
    """The app under uvicorn, so event streams are real, long-lived HTTP responses."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, lambda: None if thread.is_alive() else "the API thread exited")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


async def _open_stream(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str]
) -> AsyncIterator[httpx.Response]:
    async with client.stream("GET", f"/api/ai/jobs/{job_id}/events", headers=headers) as r:
        yield r


async def test_f8_event_streams_are_capped_per_tenant_and_end_in_time(
    served: str, settings: Settings, plan: Settings, api: httpx.AsyncClient
) -> None:
    plan.tenant_max_event_streams = 2
    plan.event_stream_max_s = 10
    for company in ("streamer", "bystander"):
        seed_tenant(settings, company, lines=20)
    jobs = {}
    for company in ("streamer", "bystander"):
        r = await submit(api, settings, company, {**ONE, "delay": HOUR_MS})
        assert r.status_code == 202, r.text
        jobs[company] = r.json()["jobId"]
    mine = token(settings, "streamer")
    async with httpx.AsyncClient(base_url=served, timeout=30) as client:
        opened = [_open_stream(client, jobs["streamer"], mine) for _ in range(2)]
        first = [await anext(s) for s in opened]
        assert [r.status_code for r in first] == [200, 200]
        third = await client.get(f"/api/ai/jobs/{jobs['streamer']}/events", headers=mine)
        assert third.status_code == 429, third.text
        assert "TENANT_MAX_EVENT_STREAMS" in third.json()["detail"]
        assert int(third.headers["retry-after"]) >= 1
        # Another tenant's streams are not this tenant's business.
        async for r in _open_stream(client, jobs["bystander"], token(settings, "bystander")):
            assert r.status_code == 200
            break
        # Streams end by themselves after EVENT_STREAM_MAX_S, and their places free up.
        text = await asyncio.wait_for(first[0].aread(), 30)
        assert b"reconnect with Last-Event-ID" in text
        for s in opened:
            await s.aclose()
        r = await client.get(f"/api/ai/jobs/{jobs['streamer']}/events", headers=mine)
        assert r.status_code == 200
    for company, job_id in jobs.items():
        await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=token(settings, company))


async def test_f10_the_loss_curve_is_drawn_once_per_change(
    api: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import job_insights

    company = "painter"
    seed_tenant(settings, company, lines=40)
    headers = token(settings, company)
    r = await submit(api, settings, company, ONE)
    job_id = r.json()["jobId"]
    assert (await follow(api, job_id, headers))[-1]["state"] == "completed"
    drawn = []
    real = job_insights._draw_loss
    monkeypatch.setattr(job_insights, "_draw_loss", lambda d: drawn.append(1) or real(d))
    pngs = [(await api.get(f"/api/ai/jobs/{job_id}/loss.png", headers=headers)) for _ in range(5)]
    assert all(p.status_code == 200 and p.content == pngs[0].content for p in pngs)
    assert pngs[0].content.startswith(b"\x89PNG")
    assert len(drawn) == 1


async def test_f15_job_ids_cannot_be_derived_and_other_tenants_ids_answer_alike(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    company = "keyed"
    seed_tenant(settings, company, lines=20)
    key = {"Idempotency-Key": "k1"}
    r = await submit(api, settings, company, {**ONE, "delay": HOUR_MS}, **key)
    job_id = r.json()["jobId"]
    public = uuid.uuid5(uuid.NAMESPACE_URL, f"{company}/k1").hex[:16]
    assert not job_id.endswith(public), "the id is computable from the key alone"
    again = await submit(
        api, settings, company, {**ONE, "delay": HOUR_MS}, **{"Idempotency-Key": "k1"}
    )
    assert again.json()["jobId"] == job_id, "the same key is the same job"
    # Another tenant gets the same answer for a job that exists and one that does not.
    stranger = token(settings, "stranger")
    missing = job_id[:-1] + ("0" if job_id[-1] != "0" else "1")
    answers = [await api.get(f"/api/ai/jobs/{j}", headers=stranger) for j in (job_id, missing)]
    assert [a.status_code for a in answers] == [404, 404]
    assert answers[0].json()["detail"].replace(job_id, "X") == answers[1].json()["detail"].replace(
        missing, "X"
    )
    await api.post(f"/api/ai/jobs/{job_id}/cancel", headers=token(settings, company))


async def test_f16_results_and_failures_show_no_server_paths(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    company = "pathless"
    seed_tenant(settings, company, lines=40)
    headers = token(settings, company)
    r = await submit(api, settings, company, ONE)
    done = (await follow(api, r.json()["jobId"], headers))[-1]
    assert done["state"] == "completed"
    # A job that fails on its data: the reason names the file, not where the server keeps it.
    bad = settings.tenant_data_dir("pathless2")
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "data.jsonl").write_text("".join(chat_line(f"q{i}", f"a{i}") + "\n" for i in range(12)))
    r = await submit(api, settings, "pathless2", {**ONE, "delay": 2000})
    assert r.status_code == 202, r.text
    (bad / "data.jsonl").write_text("not json\n")
    failed = (await follow(api, r.json()["jobId"], token(settings, "pathless2")))[-1]
    assert failed["state"] == "failed"
    roots = {
        str(p)
        for d in (settings.models_dir, settings.data_dir, settings.state_dir)
        for p in (d, d.resolve())
    }
    for job in (done, failed):
        text = json.dumps(job)
        leaked = [root for root in roots if root in text]
        assert not leaked, f"{leaked} in {text}"
    assert done["result"]["modelPath"] == done["jobId"]
    assert done["result"]["baseModel"] == "tiny-mistral"
