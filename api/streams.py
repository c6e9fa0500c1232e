"""How many live /events streams (server-sent events) a tenant may hold, across API processes.

Each open stream is a member of the tenant's Redis ZSET, scored by when it must end at the
latest, so a stream whose process died without closing it frees its place by itself. Without
Redis, each process counts its own.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import HTTPException, Request, status
from redis.exceptions import RedisError

from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings

# KEYS: the tenant's streams. ARGV: now ms, this stream's deadline ms, cap, stream id.
_OPEN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(first[2]) - tonumber(ARGV[1])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 0
"""

_local: Counter[str] = Counter()


@asynccontextmanager
async def event_stream_slot(request: Request, company_id: str) -> AsyncIterator[float]:
    """Hold one of the tenant's stream places for the stream's life; yields its deadline
    (monotonic seconds). 429 with Retry-After when the tenant holds them all."""
    settings: Settings = request.app.state.settings
    mirror: JobMirror = request.app.state.mirror
    cap = settings.limit(company_id, "max_event_streams")
    lifetime_s = settings.event_stream_max_s
    key = mirror.key("streams", company_id)
    stream_id = uuid.uuid4().hex
    now_ms = int(time.time() * 1000)
    shared = True
    try:
        wait_ms = int(
            await mirror.redis.eval(
                _OPEN, 1, key, now_ms, now_ms + lifetime_s * 1000, cap, stream_id
            )
        )
    except (RedisError, OSError):
        shared, wait_ms = False, 0
        if _local[company_id] >= cap:
            wait_ms = 30_000
    if wait_ms > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"company '{company_id}' already has {cap} open event streams "
            "(TENANT_MAX_EVENT_STREAMS); close one, or poll GET /api/ai/jobs/{id}",
            headers={"Retry-After": str(max(1, -(-wait_ms // 1000)))},
        )
    _local[company_id] += 1
    try:
        yield time.monotonic() + lifetime_s
    finally:
        _local[company_id] -= 1
        if shared:
            try:
                await mirror.redis.zrem(key, stream_id)
            except (RedisError, OSError):
                pass  # its score ends it by itself
