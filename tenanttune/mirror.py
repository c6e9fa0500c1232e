"""The Bull-shaped job mirror in Redis (Bull v3/v4 key layout).

``<prefix>:<queue>:wait|active|paused`` are LISTs of job ids, ``delayed|completed|failed`` are
ZSETs scored by time in ms, and ``<prefix>:<queue>:<jobId>`` is a HASH with Bull's field names.
Every move is one Lua script, so a job is in exactly one collection at any moment.

Redis is a cache: Temporal is the truth. Callers treat every error here as a miss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from tenanttune.jobs import JobState

LISTS = {JobState.WAITING: "wait", JobState.ACTIVE: "active", JobState.PAUSED: "paused"}
ZSETS = {JobState.DELAYED: "delayed", JobState.COMPLETED: "completed", JobState.FAILED: "failed"}
COLLECTIONS = {**LISTS, **ZSETS}
_ORDER = list(COLLECTIONS)  # KEYS[2..7] in the scripts follow this order

# KEYS: job hash, then the six collections. ARGV: job id, target index (1-based into the six),
# score, only_if_new ("1": do nothing when the hash exists), then field/value pairs.
_MOVE = """
local exists = redis.call('EXISTS', KEYS[1])
if ARGV[4] == '1' and exists == 1 then return 0 end
for i = 2, 7 do
  if i <= 4 then redis.call('LREM', KEYS[i], 0, ARGV[1])
  else redis.call('ZREM', KEYS[i], ARGV[1]) end
end
local target = tonumber(ARGV[2]) + 1
if target <= 4 then redis.call('LPUSH', KEYS[target], ARGV[1])
else redis.call('ZADD', KEYS[target], tonumber(ARGV[3]), ARGV[1]) end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
return 1
"""

_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class MirroredJob:
    """A job as the mirror holds it, decoded from Bull's hash fields."""

    job_id: str
    queue: str
    state: str
    name: str = ""
    company_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    opts: dict[str, Any] = field(default_factory=dict)
    progress: float = 0.0
    timestamp: int | None = None
    processed_on: int | None = None
    finished_on: int | None = None
    returnvalue: Any = None
    failed_reason: str | None = None
    attempts_made: int = 0
    stage: str = ""


class JobMirror:
    def __init__(self, redis: aioredis.Redis, prefix: str = "bull") -> None:
        self.redis = redis
        self.prefix = prefix
        self._move = redis.register_script(_MOVE)
        self._update = redis.register_script(_UPDATE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "bull", timeout_s: float = 1.0) -> JobMirror:
        client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        return cls(client, prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    def key(self, queue: str, suffix: str) -> str:
        return f"{self.prefix}:{queue}:{suffix}"

    def _keys(self, queue: str, job_id: str) -> list[str]:
        return [self.key(queue, job_id)] + [self.key(queue, COLLECTIONS[s]) for s in _ORDER]

    async def move(
        self,
        queue: str,
        job_id: str,
        state: JobState,
        fields: dict[str, Any] | None = None,
        *,
        only_if_new: bool = False,
    ) -> bool:
        """Put the job in `state`'s collection (and no other) and set hash fields atomically."""
        flat: list[str] = []
        for k, v in (fields or {}).items():
            if v is None:
                continue
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        args = [job_id, str(_ORDER.index(state) + 1), str(now_ms()), "1" if only_if_new else "0"]
        return bool(await self._move(keys=self._keys(queue, job_id), args=args + flat))

    async def add(
        self,
        queue: str,
        job_id: str,
        *,
        name: str,
        company_id: str,
        data: dict[str, Any],
        opts: dict[str, Any] | None = None,
    ) -> bool:
        """Record a new waiting job; a job already mirrored is left as it is."""
        fields = {
            "name": name,
            "companyId": company_id,
            "data": data,
            "opts": opts or {},
            "timestamp": now_ms(),
            "delay": 0,
            "priority": 0,
            "progress": 0,
            "attemptsMade": 0,
        }
        return await self.move(queue, job_id, JobState.WAITING, fields, only_if_new=True)

    async def set_fields(self, queue: str, job_id: str, fields: dict[str, Any]) -> None:
        """Update hash fields of a job that is already mirrored (progress, stage)."""
        flat: list[str] = []
        for k, v in fields.items():
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        await self._update(keys=[self.key(queue, job_id)], args=flat)

    async def get(self, queue: str, job_id: str) -> MirroredJob | None:
        raw = cast(dict[str, str], await self.redis.hgetall(self.key(queue, job_id)))
        if not raw:
            return None
        state = await self.state_of(queue, job_id)
        return MirroredJob(
            job_id=job_id,
            queue=queue,
            state=state or "unknown",
            name=raw.get("name", ""),
            company_id=raw.get("companyId", ""),
            data=_json(raw.get("data"), {}),
            opts=_json(raw.get("opts"), {}),
            progress=float(raw.get("progress") or 0),
            timestamp=_int(raw.get("timestamp")),
            processed_on=_int(raw.get("processedOn")),
            finished_on=_int(raw.get("finishedOn")),
            returnvalue=_json(raw.get("returnvalue"), None),
            failed_reason=raw.get("failedReason") or None,
            attempts_made=_int(raw.get("attemptsMade")) or 0,
            stage=raw.get("stage", ""),
        )

    async def state_of(self, queue: str, job_id: str) -> str | None:
        """Which collection holds the job (Bull's getState)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in _ORDER:
                key = self.key(queue, COLLECTIONS[state])
                if state in LISTS:
                    pipe.lpos(key, job_id)
                else:
                    pipe.zscore(key, job_id)
            found = await pipe.execute()
        for state, hit in zip(_ORDER, found, strict=True):
            if hit is not None:
                return state.value
        return None

    async def counts(self, queue: str) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in _ORDER:
                key = self.key(queue, COLLECTIONS[state])
                if state in LISTS:
                    pipe.llen(key)
                else:
                    pipe.zcard(key)
            found = await pipe.execute()
        return {state.value: int(n) for state, n in zip(_ORDER, found, strict=True)}


def _json(raw: str | None, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _int(raw: str | None) -> int | None:
    try:
        return int(float(raw)) if raw not in (None, "") else None
    except ValueError:
        return None
