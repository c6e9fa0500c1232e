"""Pieces both workflows share: the status mirror call and failure messages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Generic, Protocol, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from activities.queue import QueueActivities
    from activities.status import StatusActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.types import JobOptions, JobProgress, StatusUpdate
    from tenanttune.vocab import JobState


class JobRequest(Protocol):
    job_id: str
    company_id: str
    options: JobOptions


Req = TypeVar("Req", bound=JobRequest)
Res = TypeVar("Res")

STATUS_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)


async def mirror_status(update: StatusUpdate) -> None:
    """Record a job transition in the Redis mirror. Best effort: never fails the job."""
    try:
        await workflow.execute_activity_method(
            StatusActivities.record_status,
            update,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=STATUS_RETRY,
        )
    except ActivityError as err:
        if is_cancelled_exception(err):
            raise  # a cancel arriving here must reach the workflow
        workflow.logger.warning("status %s of %s not mirrored", update.state, update.job_id)


def root_message(err: BaseException) -> str:
    """The message of the failure an activity or child workflow raised itself.

    Temporal wraps it (ActivityError, ChildWorkflowError); what it wraps in turn (e.g. a
    connection error) is usually less helpful than the activity's own sentence.
    """
    while isinstance(err, ActivityError | ChildWorkflowError) and err.__cause__ is not None:
        err = err.__cause__
    return getattr(err, "message", None) or str(err)


def retry_policy(options: JobOptions) -> RetryPolicy:
    """Bull's `attempts` and `backoff` as the main activity's Temporal retry policy."""
    return RetryPolicy(
        initial_interval=timedelta(milliseconds=max(options.backoff_delay_ms, 1)),
        backoff_coefficient=1.0 if options.backoff_type == "fixed" else 2.0,
        maximum_attempts=max(options.attempts, 1),
        non_retryable_error_types=NON_RETRYABLE_ERRORS,
    )


PAUSE_RECHECK = timedelta(seconds=30)


async def wait_while_paused(
    queue: str, released: Callable[[], bool], on_paused: Callable[[], Awaitable[None]]
) -> None:
    """Hold a new job while its queue is paused; a `release` signal or a recheck lets it go."""
    if not await _paused(queue):
        return
    await on_paused()
    while True:
        try:
            await workflow.wait_condition(released, timeout=PAUSE_RECHECK)
            return
        except TimeoutError:
            if not await _paused(queue):
                return


async def _paused(queue: str) -> bool:
    try:
        return await workflow.execute_activity_method(
            QueueActivities.queue_paused,
            queue,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=STATUS_RETRY,
        )
    except ActivityError as err:
        if is_cancelled_exception(err):
            raise
        return False  # cannot tell: run rather than hang


class JobWorkflow(Generic[Req, Res]):
    """What every job workflow shares, written once: the pause gate and its `release` signal,
    stage and progress with the `progress` query, the mirror writes, and the failure reason.

    `run` of a subclass is one line, `return await self.execute(req)`; its business steps are in
    `steps`, and `on_failure` may undo what they did. Subclasses set QUEUE, NAME, FIRST_STAGE.
    """

    QUEUE = ""
    NAME = ""
    FIRST_STAGE = ""

    def __init__(self) -> None:
        self._stage = "waiting"
        self._progress = 0.0
        self._released = False

    @workflow.signal
    def release(self) -> None:
        """Let a job held by a paused queue start (sent by resume, in queue order)."""
        self._released = True

    @workflow.query
    def progress(self) -> JobProgress:
        """Stage and coarse progress; step-level training progress is in the heartbeat."""
        return JobProgress(stage=self._stage, progress=self._progress)

    async def steps(self, req: Req) -> Res:
        """The job's business steps; raise to fail the job."""
        raise NotImplementedError

    async def on_failure(self, req: Req, cancelled: bool) -> str:  # noqa: ARG002 - a hook
        """Undo what the steps left behind; returns words to add to the failure reason."""
        return ""

    def set_stage(self, stage: str, progress: float | None = None) -> None:
        self._stage = stage
        if progress is not None:
            self._progress = progress

    async def execute(self, req: Req) -> Res:
        """The template: wait while paused, run the steps, record the outcome in the mirror."""
        try:
            await self._hold_while_paused(req)
            self._stage = self.FIRST_STAGE
            await self._status(req, JobState.ACTIVE)
            result = await self.steps(req)
        except (ActivityError, ApplicationError, asyncio.CancelledError, CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            if cancelled:
                reason = f"cancelled during {self._stage}"
            else:
                reason = f"{self._stage} failed: {root_message(err)}"
            reason += await self.on_failure(req, cancelled)
            self._stage = "failed"
            await self._status(
                req,
                JobState.FAILED,
                failed_reason=reason,
                keep=req.options.remove_on_fail,
                attempts_made=req.options.attempts_before + 1,
            )
            if cancelled:
                raise  # Temporal records the run as cancelled
            raise ApplicationError(reason, non_retryable=True) from err
        self._stage, self._progress = "completed", 100.0
        await self._status(
            req,
            JobState.COMPLETED,
            result=asdict(result),  # type: ignore[call-overload]
            progress=100.0,
            keep=req.options.remove_on_complete,
            attempts_made=req.options.attempts_before + 1,
        )
        return result

    async def _hold_while_paused(self, req: JobRequest) -> None:
        async def paused() -> None:
            self._stage = "paused"
            await self._status(req, JobState.PAUSED)

        await wait_while_paused(self.QUEUE, lambda: self._released, paused)

    async def _status(self, req: JobRequest, state: JobState, **fields: object) -> None:
        if state in (JobState.COMPLETED, JobState.FAILED):
            # For the job-duration histogram; workflow time, so replay gives the same value.
            started = workflow.info().start_time
            fields.setdefault("duration_s", (workflow.now() - started).total_seconds())
        await mirror_status(
            StatusUpdate(
                job_id=req.job_id,
                queue=self.QUEUE,
                company_id=req.company_id,
                name=self.NAME,
                state=state.value,
                stage=self._stage,
                **{"attempts_made": req.options.attempts_before, **fields},  # type: ignore[arg-type]
            )
        )
