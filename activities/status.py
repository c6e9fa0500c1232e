"""The only activity that writes the Redis mirror. Best effort: Redis down never fails a job."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError
from temporalio import activity

from tenanttune import telemetry
from tenanttune.mirror import JobMirror, now_ms
from tenanttune.settings import Settings
from tenanttune.types import StatusUpdate
from tenanttune.vocab import JobState
from tenanttune.wire import public_result, public_text, to_wire

EVENTS_BACKOFF_S = 30.0
log = logging.getLogger(__name__)


class StatusActivities:
    def __init__(self, mirror: JobMirror, settings: Settings) -> None:
        self.mirror = mirror
        self.settings = settings
        self._events_paused_until = 0.0
        self._last_progress: dict[str, float] = {}

    @activity.defn
    async def record_status(self, update: StatusUpdate) -> bool:
        """Move the job to its new Bull state; False (not an error) when Redis is unavailable."""
        state = JobState(update.state)
        fields: dict[str, object] = {"stage": update.stage} if update.stage else {}
        if update.company_id:
            fields["companyId"] = update.company_id
        if update.name:
            fields["name"] = update.name
        if update.progress is not None:
            fields["progress"] = update.progress
        if update.attempts_made is not None:
            fields["attemptsMade"] = update.attempts_made
        if state is JobState.ACTIVE:
            fields["processedOn"] = now_ms()
        if state in (JobState.COMPLETED, JobState.FAILED):
            fields["finishedOn"] = now_ms()
        # What the tenant reads: camelCase, paths relative to its models dir.
        result = (
            public_result(update.result, self.settings, update.company_id)
            if update.result is not None
            else None
        )
        if result is not None:
            fields["returnvalue"] = result
        reason = (
            public_text(update.failed_reason, self.settings, update.company_id)
            if update.failed_reason is not None
            else None
        )
        if reason is not None:
            fields["failedReason"] = reason
        final = state in (JobState.COMPLETED, JobState.FAILED)
        if final:
            telemetry.record_job_finished(
                update.queue, update.company_id, state.value, update.duration_s
            )
        # Event type: `state` for a change of state, `completed` / `failed` for the last one.
        event: dict[str, object] = {
            "type": state.value if final else "state",
            "state": state.value,
            "stage": update.stage,
        }
        if reason is not None:
            event["failedReason"] = reason
        if result is not None:
            event["result"] = result
        try:
            moved = await self.mirror.move(
                update.queue,
                update.job_id,
                state,
                fields,
                company_id=update.company_id,
                keep=update.keep,
            )
            await self.mirror.add_event(update.queue, update.job_id, event)
            return moved
        except (RedisError, OSError) as exc:
            log.warning("mirror unavailable, %s not recorded as %s: %s", update.job_id, state, exc)
            return False

    async def record_event(self, queue: str, job_id: str, event: dict[str, object]) -> None:
        """A progress event (training step, eval, checkpoint) for the job's event stream.

        After a Redis error, events are skipped for EVENTS_BACKOFF_S: each attempt against an
        unreachable Redis waits for its timeout, which would stall the training's output.
        """
        if time.monotonic() < self._events_paused_until:
            return
        try:
            await self.mirror.add_event(queue, job_id, to_wire(event))
        except Exception as exc:  # noqa: BLE001 - events are cosmetic; never fail the job
            self._events_paused_until = time.monotonic() + EVENTS_BACKOFF_S
            log.debug("mirror unavailable, event of %s not recorded: %s", job_id, exc)

    async def report_progress(
        self, queue: str, job_id: str, progress: float, stage: str = "", min_interval_s: float = 1.0
    ) -> None:
        """Progress from inside a long activity, at most once per `min_interval_s`."""
        now = time.monotonic()
        if now - self._last_progress.get(job_id, 0.0) < min_interval_s and progress < 100:
            return
        self._last_progress[job_id] = now
        fields: dict[str, object] = {"progress": round(progress, 1)}
        if stage:
            fields["stage"] = stage
        try:
            await self.mirror.set_fields(queue, job_id, fields)
        except Exception as exc:  # noqa: BLE001 - progress is cosmetic; never fail the job
            log.debug("mirror unavailable, progress of %s not recorded: %s", job_id, exc)
