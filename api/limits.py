"""Per-token request rate limit (Redis) and per-tenant job quotas.

Rate limit: a sliding-window log per token subject in Redis, so every API process shares it.
With Redis unreachable it fails OPEN for reads (GET/HEAD: status must stay answerable from
Temporal) and CLOSED for writes (no job can be started while requests cannot be counted).

Quotas: a tenant may have `max_running_jobs` active and `max_queued_jobs` waiting, delayed or
paused jobs; a new job beyond either is refused with 429 and Retry-After. Counted from the
mirror; with Redis down, from Temporal's visibility (all unfinished jobs against the sum).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import HTTPException, Request, status
from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from tenanttune.auth import Principal
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, Settings

READ_METHODS = {"GET", "HEAD", "OPTIONS"}
WINDOW_MS = 60_000

# KEYS: the token's log (ZSET). ARGV: now ms, window ms, limit, unique member.
# Returns {allowed (1/0), remaining or ms until a slot frees}.
_SLIDING_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + tonumber(ARGV[2]) - tonumber(ARGV[1])}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tonumber(ARGV[3]) - n - 1}
"""


def _too_many(message: str, retry_after_s: int) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        message,
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


async def check_rate(request: Request, principal: Principal) -> None:
    settings: Settings = request.app.state.settings
    limit = settings.limit(principal.company_id, "rate_limit_per_minute")
    if limit == 0:
        return
    mirror: JobMirror = request.app.state.mirror
    key = f"{settings.redis_prefix}:ratelimit:{principal.company_id}:{principal.subject}"
    now = int(time.time() * 1000)
    try:
        allowed, value = await mirror.redis.eval(
            _SLIDING_WINDOW, 1, key, now, WINDOW_MS, limit, f"{now}-{uuid.uuid4().hex[:8]}"
        )
    except (RedisError, OSError) as exc:
        if request.method in READ_METHODS:
            return  # fail open: reading status must keep working without the cache
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the request rate limiter (Redis) is unreachable, so changes are refused for now; "
            "reads still work — retry shortly",
            headers={"Retry-After": "5"},
        ) from exc
    if not allowed:
        raise _too_many(
            f"rate limit: {limit} requests per minute for this token "
            "(RATE_LIMIT_PER_MINUTE or its TENANT_LIMITS override); slow down",
            -(-int(value) // 1000),
        )


async def check_job_quota(
    settings: Settings, mirror: JobMirror, client: Client, company_id: str
) -> None:
    """429 when the tenant already has as many unfinished jobs as its limits allow."""
    max_running = settings.limit(company_id, "max_running_jobs")
    max_queued = settings.limit(company_id, "max_queued_jobs")
    retry_after = settings.quota_retry_after_s
    try:
        running, queued = await mirror.tenant_load(list(QUEUES), company_id)
        if running >= max_running or queued >= max_queued:
            # About to refuse: first forget jobs Temporal has closed but the mirror never heard
            # of (terminated, timed out, or finished while Redis was down), so a stale entry can
            # never lock a tenant out.
            if await _forget_closed(mirror, client, company_id):
                running, queued = await mirror.tenant_load(list(QUEUES), company_id)
    except (RedisError, OSError):
        unfinished = (
            await client.count_workflows(
                f"CompanyId = '{company_id}' AND ExecutionStatus = 'Running'"
            )
        ).count
        if unfinished >= max_running + max_queued:
            raise _too_many(
                f"company '{company_id}' has {unfinished} unfinished jobs, its limit is "
                f"{max_running + max_queued} (TENANT_MAX_RUNNING_JOBS + TENANT_MAX_QUEUED_JOBS); "
                "wait for one to finish",
                retry_after,
            ) from None
        return
    if running >= max_running:
        raise _too_many(
            f"company '{company_id}' has {running} jobs running, its limit is {max_running} "
            "(TENANT_MAX_RUNNING_JOBS); wait for one to finish",
            retry_after,
        )
    if queued >= max_queued:
        raise _too_many(
            f"company '{company_id}' has {queued} jobs waiting, its limit is {max_queued} "
            "(TENANT_MAX_QUEUED_JOBS); wait for some to start",
            retry_after,
        )


async def _forget_closed(mirror: JobMirror, client: Client, company_id: str) -> int:
    forgotten = 0
    for queue in QUEUES:
        for job_id in await mirror.open_jobs(queue, company_id):
            try:
                desc = await client.get_workflow_handle(job_id).describe()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                closed = True
            else:
                closed = desc.status != WorkflowExecutionStatus.RUNNING
            if closed:
                await mirror.forget_open(queue, company_id, job_id)
                forgotten += 1
    return forgotten


@contextlib.asynccontextmanager
async def tenant_submission_lock(mirror: JobMirror, company_id: str) -> AsyncIterator[None]:
    """Serialise one tenant's quota check + mirror add across API processes (a Redis lock
    that expires by itself), so concurrent submissions cannot slip past the quota together.
    Without Redis there is nothing to count against, and nothing to lock."""
    key = mirror.key("quota", f"lock:{company_id}")
    token = uuid.uuid4().hex
    held = False
    try:
        deadline = time.monotonic() + 10
        while not (held := bool(await mirror.redis.set(key, token, nx=True, px=10_000))):
            if time.monotonic() > deadline:
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"too many simultaneous submissions for company '{company_id}'; retry",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(0.01)
    except (RedisError, OSError):
        held = False
    try:
        yield
    finally:
        if held:
            with contextlib.suppress(RedisError, OSError):
                await mirror.redis.eval(_UNLOCK, 1, key, token)


_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
