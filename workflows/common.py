"""Pieces both workflows share: the status mirror call and failure messages."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.status import StatusActivities
    from tenanttune.types import StatusUpdate

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
    except ActivityError:
        workflow.logger.warning("status %s of %s not mirrored", update.state, update.job_id)


def root_message(err: BaseException) -> str:
    """The message of the failure an activity or child workflow raised itself.

    Temporal wraps it (ActivityError, ChildWorkflowError); what it wraps in turn (e.g. a
    connection error) is usually less helpful than the activity's own sentence.
    """
    while isinstance(err, ActivityError | ChildWorkflowError) and err.__cause__ is not None:
        err = err.__cause__
    return getattr(err, "message", None) or str(err)
