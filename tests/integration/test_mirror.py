"""The Bull-shaped mirror on the real Redis: one collection per job, retention, clean."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tenanttune.mirror import COLLECTIONS, JobMirror
from tenanttune.vocab import JobState
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration
Q = "model-training"


@pytest.fixture
async def mirror() -> AsyncIterator[JobMirror]:
    m = JobMirror.from_url(TEST_REDIS_URL, prefix="bull-mirror-test")
    keys = [k async for k in m.redis.scan_iter("bull-mirror-test:*")]
    if keys:
        await m.redis.delete(*keys)
    yield m
    await m.close()


async def where(m: JobMirror, job_id: str) -> list[str]:
    r: aioredis.Redis = m.redis
    found = []
    for state, coll in COLLECTIONS.items():
        key = m.key(Q, coll)
        hit = await (
            r.lpos(key, job_id) if coll in ("wait", "active", "paused") else r.zscore(key, job_id)
        )
        if hit is not None:
            found.append(state.value)
    return found


async def test_every_move_leaves_the_job_in_exactly_one_collection(mirror: JobMirror) -> None:
    job = "train-acme-00000000000000a1"
    assert await mirror.add(Q, job, name="train", company_id="acme", data={"epochs": 3})
    assert not await mirror.add(Q, job, name="train", company_id="acme", data={})  # no reset
    assert await where(mirror, job) == ["waiting"]
    assert await mirror.redis.get(mirror.key(Q, "id")) == "1"
    for state in (
        JobState.PAUSED,
        JobState.ACTIVE,
        JobState.FAILED,
        JobState.WAITING,
        JobState.ACTIVE,
        JobState.COMPLETED,
    ):
        await mirror.move(Q, job, state, {"progress": 50}, company_id="acme")
        assert await where(mirror, job) == [state.value]
        assert await mirror.state_of(Q, job) == state.value
    h = await mirror.redis.hgetall(mirror.key(Q, job))
    assert json.loads(h["data"]) == {"epochs": 3} and h["companyId"] == "acme"
    assert {
        "name",
        "data",
        "opts",
        "timestamp",
        "delay",
        "priority",
        "progress",
        "attemptsMade",
    } <= set(h)
    counts = await mirror.counts(Q)
    assert counts["completed"] == 1 and sum(counts.values()) == 1


async def test_delayed_jobs_are_scored_by_their_start_time(mirror: JobMirror) -> None:
    job = "train-acme-00000000000000a2"
    await mirror.add(Q, job, name="train", company_id="acme", data={}, delay_ms=60_000)
    assert await where(mirror, job) == ["delayed"]
    score = await mirror.redis.zscore(mirror.key(Q, "delayed"), job)
    timestamp = int(await mirror.redis.hget(mirror.key(Q, job), "timestamp"))
    assert score == timestamp + 60_000


async def test_retention_and_clean_keep_the_newest(mirror: JobMirror) -> None:
    ids = [f"train-acme-00000000000000b{i}" for i in range(5)]
    for n, job in enumerate(ids):
        await mirror.add(Q, job, name="train", company_id="acme", data={})
        await mirror.move(Q, job, JobState.COMPLETED, company_id="acme", score=1000 + n)
    await mirror.add_event(Q, ids[0], {"type": "completed"})
    # removeOnComplete: 2 keeps the two newest and forgets the rest entirely (events too).
    extra = "train-acme-00000000000000b9"
    await mirror.add(Q, extra, name="train", company_id="acme", data={})
    await mirror.move(Q, extra, JobState.COMPLETED, company_id="acme", keep=2, score=2000)
    left = await mirror.redis.zrange(mirror.key(Q, "completed"), 0, -1)
    assert left == [ids[4], extra]
    assert not await mirror.redis.exists(mirror.key(Q, ids[0]) + ":events")
    assert not await mirror.redis.exists(mirror.key(Q, ids[0]))
    assert await mirror.company_jobs(Q, "acme", 10) == [extra, ids[4]]
    # clean(grace, limit): keep the newest `limit`, remove older ones past the grace period.
    removed = await mirror.clean(Q, JobState.COMPLETED, grace_ms=0, limit=1)
    assert removed == [ids[4]]
    assert await mirror.redis.zrange(mirror.key(Q, "completed"), 0, -1) == [extra]
    recent = "train-acme-00000000000000c0"
    await mirror.add(Q, recent, name="train", company_id="acme", data={})
    await mirror.move(Q, recent, JobState.COMPLETED, company_id="acme")
    assert await mirror.clean(Q, JobState.COMPLETED, grace_ms=3_600_000, limit=0) == [extra]
    # removeOnComplete: true forgets the job as it completes.
    gone = "train-acme-00000000000000c1"
    await mirror.add(Q, gone, name="train", company_id="acme", data={})
    await mirror.move(Q, gone, JobState.COMPLETED, company_id="acme", keep=0)
    assert await where(mirror, gone) == [] and not await mirror.redis.exists(mirror.key(Q, gone))


async def test_keep_n_trims_only_the_submitting_tenants_jobs(mirror: JobMirror) -> None:
    """F1: removeOnComplete: 1 of one tenant never trims another tenant's finished jobs."""
    victims = [f"train-victim-00000000000000d{i}" for i in range(3)]
    for n, job in enumerate(victims):
        await mirror.add(Q, job, name="train", company_id="victim", data={})
        await mirror.move(Q, job, JobState.COMPLETED, company_id="victim", score=1000 + n)
    await mirror.add_event(Q, victims[0], {"type": "completed"})
    before = {job: await mirror.redis.hgetall(mirror.key(Q, job)) for job in victims}
    for n in range(2):
        mine = f"train-mallory-00000000000000e{n}"
        await mirror.add(Q, mine, name="train", company_id="mallory", data={})
        await mirror.move(Q, mine, JobState.COMPLETED, company_id="mallory", keep=1, score=3000 + n)
    assert await mirror.company_jobs(Q, "victim", 10) == victims[::-1]
    assert {job: await mirror.redis.hgetall(mirror.key(Q, job)) for job in victims} == before
    assert await mirror.events(Q, victims[0])
    # The tenant's own keep-1 held: only its newest job is left.
    assert await mirror.company_jobs(Q, "mallory", 10) == ["train-mallory-00000000000000e1"]
    completed = await mirror.redis.zrange(mirror.key(Q, "completed"), 0, -1)
    assert completed == [*victims, "train-mallory-00000000000000e1"]
