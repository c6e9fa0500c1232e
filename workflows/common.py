"""Pieces both workflows share: the status mirror call and failure messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ChildWorkflowError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.queue import QueueActivities
    from activities.status import StatusActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.types import JobOptions, StatusUpdate

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
