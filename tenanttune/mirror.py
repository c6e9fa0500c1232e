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

from tenanttune.vocab import JobState

LISTS = {JobState.WAITING: "wait", JobState.ACTIVE: "active", JobState.PAUSED: "paused"}
ZSETS = {JobState.DELAYED: "delayed", JobState.COMPLETED: "completed", JobState.FAILED: "failed"}
COLLECTIONS = {**LISTS, **ZSETS}
_ORDER = list(COLLECTIONS)  # KEYS[2..7] in the scripts follow this order
# A job's progress events (`<prefix>:<queue>:<jobId>:events`): newest ~EVENTS_MAX kept, a week.
EVENTS_MAX = 5000
EVENTS_TTL_S = 7 * 24 * 3600

# KEYS: job hash, the six collections, the tenant's index, the tenant's unfinished set.
# ARGV: job id, target index (1-based into the six), score, only_if_new ("1": do nothing
# when the hash exists), keep (retention in the target ZSET among this tenant's jobs: -1 all,
# N newest N), the queue's key prefix, field/value pairs.
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
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
if exists == 0 then redis.call('ZADD', KEYS[8], tonumber(ARGV[3]), ARGV[1]) end
if target <= 5 then redis.call('SADD', KEYS[9], ARGV[1])
else redis.call('SREM', KEYS[9], ARGV[1]) end
local keep = tonumber(ARGV[5])
if keep == 0 and target > 4 then
  redis.call('ZREM', KEYS[target], ARGV[1])
  redis.call('DEL', KEYS[1], KEYS[1] .. ':events')
  redis.call('ZREM', KEYS[8], ARGV[1])
elseif keep > 0 and target > 4 then
  -- Bull's keep-N, within this tenant's own jobs: another tenant's are never touched.
  local mine = {}
  for _, id in ipairs(redis.call('ZRANGE', KEYS[8], 0, -1)) do
    local score = redis.call('ZSCORE', KEYS[target], id)
    if score then mine[#mine + 1] = {tonumber(score), id} end
  end
  if #mine > keep then
    table.sort(mine, function(a, b) return a[1] < b[1] end)
    for i = 1, #mine - keep do
      local id = mine[i][2]
      redis.call('ZREM', KEYS[target], id)
      redis.call('DEL', ARGV[6] .. id, ARGV[6] .. id .. ':events')
      redis.call('ZREM', KEYS[8], id)
    end
  end
end
return 1
"""

# KEYS: one ZSET (completed or failed). ARGV: the queue's key prefix, cutoff score, limit.
# Removes entries scored before the cutoff, never touching the newest `limit` entries.
_CLEAN = """
local candidates = redis.call('ZRANGE', KEYS[1], 0, -(tonumber(ARGV[3]) + 1), 'WITHSCORES')
local removed = {}
for i = 1, #candidates, 2 do
  local id, score = candidates[i], tonumber(candidates[i + 1])
  if score < tonumber(ARGV[2]) then
    local company = redis.call('HGET', ARGV[1] .. id, 'companyId')
    redis.call('ZREM', KEYS[1], id)
    redis.call('DEL', ARGV[1] .. id)
    if company then redis.call('ZREM', ARGV[1] .. 'company:' .. company, id) end
    removed[#removed + 1] = id
  end
end
return removed
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
        self._clean = redis.register_script(_CLEAN)

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

    def _keys(self, queue: str, job_id: str, company_id: str) -> list[str]:
        collections = [self.key(queue, COLLECTIONS[s]) for s in _ORDER]
        return [
            self.key(queue, job_id),
            *collections,
            self.key(queue, f"company:{company_id}"),
            self.key(queue, f"company:{company_id}:open"),
        ]

    async def move(
        self,
        queue: str,
        job_id: str,
        state: JobState,
        fields: dict[str, Any] | None = None,
        *,
        company_id: str = "",
        only_if_new: bool = False,
        keep: int = -1,
        score: int | None = None,
    ) -> bool:
        """Put the job in `state`'s collection (and no other) and set hash fields atomically.

        `keep` (for completed/failed) keeps only that many newest jobs there, like Bull's
        removeOnComplete / removeOnFail; 0 removes this job at once.
        """
        flat: list[str] = []
        for k, v in (fields or {}).items():
            if v is None:
                continue
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        args = [
            job_id,
            str(_ORDER.index(state) + 1),
            str(score if score is not None else now_ms()),
            "1" if only_if_new else "0",
            str(keep),
            self.key(queue, ""),
        ]
        keys = self._keys(
            queue, job_id, company_id or str(fields and fields.get("companyId") or "")
        )
        return bool(await self._move(keys=keys, args=args + flat))

    async def add(
        self,
        queue: str,
        job_id: str,
        *,
        name: str,
        company_id: str,
        data: dict[str, Any],
        opts: dict[str, Any] | None = None,
        delay_ms: int = 0,
        priority: int = 0,
    ) -> bool:
        """Record a new job, waiting (or delayed); a job already mirrored is left as it is."""
        created = now_ms()
        fields = {
            "name": name,
            "companyId": company_id,
            "data": data,
            "opts": opts or {},
            "timestamp": created,
            "delay": delay_ms,
            "priority": priority,
            "progress": 0,
            "attemptsMade": 0,
        }
        state = JobState.DELAYED if delay_ms > 0 else JobState.WAITING
        added = await self.move(
            queue,
            job_id,
            state,
            fields,
            company_id=company_id,
            only_if_new=True,
            score=created + delay_ms,
        )
        if added:
            await self.redis.incr(self.key(queue, "id"))
        return added

    async def remove(self, queue: str, job_id: str) -> None:
        """Forget a job entirely (its hash, its collection, the tenant index)."""
        company = cast(str | None, await self.redis.hget(self.key(queue, job_id), "companyId"))
        async with self.redis.pipeline(transaction=True) as pipe:
            for state in _ORDER:
                key = self.key(queue, COLLECTIONS[state])
                if state in LISTS:
                    pipe.lrem(key, 0, job_id)
                else:
                    pipe.zrem(key, job_id)
            pipe.delete(self.key(queue, job_id), self.events_key(queue, job_id))
            if company:
                pipe.zrem(self.key(queue, f"company:{company}"), job_id)
                pipe.srem(self.key(queue, f"company:{company}:open"), job_id)
            await pipe.execute()

    async def requeue_failed(
        self, queue: str, job_id: str, company_id: str, attempts_made: int
    ) -> bool:
        """A failed job back to waiting for its retry, its old failure and events forgotten.
        False (and nothing changed) unless the job is failed here."""
        if await self.state_of(queue, job_id) != JobState.FAILED:
            return False
        moved = await self.move(
            queue,
            job_id,
            JobState.WAITING,
            {"failedReason": "", "finishedOn": "", "progress": 0, "attemptsMade": attempts_made},
            company_id=company_id,
        )
        if moved:  # the new run's event stream starts empty, not with the old failure
            await self.redis.delete(self.events_key(queue, job_id))
        return moved

    async def open_jobs(self, queue: str, company_id: str) -> list[str]:
        """The tenant's jobs in this queue that the mirror counts as not finished."""
        found = await self.redis.smembers(self.key(queue, f"company:{company_id}:open"))
        return sorted(str(x) for x in found)

    async def forget_open(self, queue: str, company_id: str, job_id: str) -> None:
        """Stop counting a job Temporal has closed (its end never reached the mirror)."""
        await self.redis.srem(self.key(queue, f"company:{company_id}:open"), job_id)

    async def tenant_load(self, queues: list[str], company_id: str) -> tuple[int, int]:
        """(running, queued) unfinished jobs of one tenant across `queues` — for its quotas."""
        running = queued = 0
        for queue in queues:
            open_ids = await self.redis.smembers(self.key(queue, f"company:{company_id}:open"))
            if not open_ids:
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in open_ids:
                    pipe.lpos(self.key(queue, COLLECTIONS[JobState.ACTIVE]), str(job_id))
                found = await pipe.execute()
            active = sum(1 for pos in found if pos is not None)
            running += active
            queued += len(found) - active
        return running, queued

    async def clean(self, queue: str, state: JobState, grace_ms: int, limit: int) -> list[str]:
        """Remove finished jobs older than `grace_ms`, keeping the newest `limit` (Bull's clean)."""
        if state not in (JobState.COMPLETED, JobState.FAILED):
            raise ValueError("clean works on completed or failed jobs")
        removed = await self._clean(
            keys=[self.key(queue, COLLECTIONS[state])],
            args=[self.key(queue, ""), str(now_ms() - grace_ms), str(limit)],
        )
        return [str(x) for x in removed]

    async def company_jobs(self, queue: str, company_id: str, limit: int) -> list[str]:
        """The tenant's newest job ids in this queue."""
        ids = await self.redis.zrevrange(self.key(queue, f"company:{company_id}"), 0, limit - 1)
        return [str(x) for x in ids]

    async def set_fields(self, queue: str, job_id: str, fields: dict[str, Any]) -> None:
        """Update hash fields of a job that is already mirrored (progress, stage)."""
        flat: list[str] = []
        for k, v in fields.items():
            flat += [k, v if isinstance(v, str) else json.dumps(v)]
        await self._update(keys=[self.key(queue, job_id)], args=flat)

    async def get(self, queue: str, job_id: str) -> MirroredJob | None:
        """The job's hash and its state, in one round trip (a status read is on the hot path)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key(queue, job_id))
            self._membership(pipe, queue, job_id)
            found = await pipe.execute()
        raw = cast(dict[str, str], found[0])
        if not raw:
            return None
        state = _state_from(found[1:])
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
            self._membership(pipe, queue, job_id)
            return _state_from(await pipe.execute())

    def _membership(self, pipe: Any, queue: str, job_id: str) -> None:
        for state in _ORDER:
            key = self.key(queue, COLLECTIONS[state])
            if state in LISTS:
                pipe.lpos(key, job_id)
            else:
                pipe.zscore(key, job_id)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    def events_key(self, queue: str, job_id: str) -> str:
        return self.key(queue, f"{job_id}:events")

    async def add_event(self, queue: str, job_id: str, event: dict[str, Any]) -> str:
        """Append to the job's progress stream (a Redis STREAM the SSE route follows)."""
        key = self.events_key(queue, job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"data": json.dumps(event)}, maxlen=EVENTS_MAX, approximate=True)
            pipe.expire(key, EVENTS_TTL_S)
            entry_id, _ = await pipe.execute()
        return str(entry_id)

    async def events(
        self, queue: str, job_id: str, after: str = "0-0", count: int = 500
    ) -> list[tuple[str, dict[str, Any]]]:
        """The job's events after stream id `after`, oldest first."""
        found = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            await self.redis.xread({self.events_key(queue, job_id): after}, count=count),
        )
        return [
            (str(entry_id), _json(fields.get("data"), {}))
            for _, entries in found
            for entry_id, fields in entries
        ]

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


def _state_from(found: list[Any]) -> str | None:
    """The state whose collection answered (LPOS / ZSCORE replies in `_ORDER`)."""
    for state, hit in zip(_ORDER, found, strict=True):
        if hit is not None:
            return state.value
    return None


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
