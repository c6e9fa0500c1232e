"""Request limits kept in Redis, so every API process shares them. Job quotas are the front
door's (jobs/admission.py).

- A tenant's request rate: one sliding-window log per company, whatever token (subject) of it
  calls, so minting more tokens buys no more requests. With Redis unreachable it fails OPEN for
  reads (GET/HEAD: status must stay answerable from Temporal) and CLOSED for writes (no job can
  be started while requests cannot be counted).
- Failed authentications per client address: past the limit, the address gets 429 with
  Retry-After, and each API process refuses it without decoding another token until then.
  With Redis unreachable it fails open (a bad token is still a 401).
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid

from fastapi import HTTPException, Request, status
from redis.exceptions import RedisError

from tenanttune.auth import Principal
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings

READ_METHODS = {"GET", "HEAD", "OPTIONS"}
WINDOW_MS = 60_000

logger = logging.getLogger(__name__)

# KEYS: the log (ZSET). ARGV: now ms, window ms, limit, unique member.
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

# KEYS: the address's failures (ZSET). ARGV: now ms, window ms, limit, unique member.
# Records one failure. Returns ms until the address is back under the limit (0: it is).
_RECORD_FAILURE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over <= 0 then
  return 0
end
local frees = redis.call('ZRANGE', KEYS[1], over - 1, over - 1, 'WITHSCORES')
return tonumber(frees[2]) + tonumber(ARGV[2]) - tonumber(ARGV[1])
"""


def _too_many(message: str, retry_after_s: float) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        message,
        headers={"Retry-After": str(max(1, -(-int(retry_after_s * 1000) // 1000)))},
    )


async def check_rate(request: Request, principal: Principal) -> None:
    """Count one request against the caller's tenant; 429 past RATE_LIMIT_PER_MINUTE."""
    settings: Settings = request.app.state.settings
    limit = settings.limit(principal.company_id, "rate_limit_per_minute")
    if limit == 0:
        return
    mirror: JobMirror = request.app.state.mirror
    key = f"{settings.redis_prefix}:ratelimit:{principal.company_id}"
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
            f"rate limit: {limit} requests per minute for tenant '{principal.company_id}', "
            "all its tokens together (RATE_LIMIT_PER_MINUTE or its TENANT_LIMITS override); "
            "slow down",
            int(value) / 1000,
        )


def client_key(host: str | None) -> str:
    """Whom failures are counted against: the address, or its /64 for IPv6 (one host commonly
    holds a whole /64, and would otherwise get a fresh budget per address)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AuthFailures:
    """Failed authentications per client address (AUTH_FAILURES_PER_MINUTE).

    The count lives in Redis (all API processes); the refusal is also remembered here until its
    Retry-After, so a blocked address's next requests cost a dict lookup: no Redis round trip,
    no signature check. The memory is bounded: at most `max_blocked` addresses.
    """

    def __init__(self, settings: Settings, mirror: JobMirror, max_blocked: int = 10_000) -> None:
        self.settings = settings
        self.mirror = mirror
        self.max_blocked = max_blocked
        self._blocked: dict[str, float] = {}  # client key -> monotonic time it may retry

    def check(self, client: str) -> None:
        """429 while `client` is over the limit (before its token is looked at)."""
        until = self._blocked.get(client)
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[client]
            return
        raise self._refusal(left)

    async def record(self, client: str) -> None:
        """Count one failure of `client`; 429 (instead of the 401) once it is over the limit."""
        limit = self.settings.auth_failures_per_minute
        if limit == 0:
            return
        key = f"{self.settings.redis_prefix}:authfail:{client}"
        now = int(time.time() * 1000)
        try:
            wait_ms = await self.mirror.redis.eval(
                _RECORD_FAILURE, 1, key, now, WINDOW_MS, limit, f"{now}-{uuid.uuid4().hex[:8]}"
            )
        except (RedisError, OSError) as exc:
            logger.warning("failed authentications are not counted (Redis: %s)", exc)
            return
        if int(wait_ms) <= 0:
            return
        self._remember(client, time.monotonic() + int(wait_ms) / 1000)
        raise self._refusal(int(wait_ms) / 1000)

    def _remember(self, client: str, until: float) -> None:
        if len(self._blocked) >= self.max_blocked:
            now = time.monotonic()
            self._blocked = {k: t for k, t in self._blocked.items() if t > now}
            while len(self._blocked) >= self.max_blocked:
                del self._blocked[next(iter(self._blocked))]  # the oldest refusal goes first
        self._blocked[client] = until

    def _refusal(self, retry_after_s: float) -> HTTPException:
        return _too_many(
            f"too many failed authentications from this address "
            f"({self.settings.auth_failures_per_minute} per minute, AUTH_FAILURES_PER_MINUTE): "
            "check your token, then retry after Retry-After seconds",
            retry_after_s,
        )
