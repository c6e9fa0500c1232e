"""The read path of job status: the Redis mirror first, Temporal when Redis misses or is down.

Results and details come out in the wire format (camelCase, paths relative to the tenant's
models dir), whichever source answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings
from tenanttune.temporal import COMPANY_ID
from tenanttune.vocab import queue_of
from tenanttune.wire import public_result, public_text, to_wire
from workflows.common import JobWorkflow

QUERY_TIMEOUT_S = 2.0
STATUS_ACTIVITY = "record_status"


@dataclass
class JobInfo:
    """A job as Bull users see it: state, progress, result or failure."""

    jobId: str  # noqa: N815 - the wire names of Bull's job
    queue: str
    companyId: str  # noqa: N815
    state: str
    progress: float
    source: str
    stage: str = ""
    result: Any = None
    failedReason: str | None = None  # noqa: N815
    attemptsMade: int = 0  # noqa: N815
    timestamp: int | None = None
    processedOn: int | None = None  # noqa: N815
    finishedOn: int | None = None  # noqa: N815
    name: str = ""
    data: Any = None
    opts: Any = None
    detail: dict[str, Any] | None = None  # the training heartbeat: step, total, loss, ...


async def find_job(
    job_id: str, mirror: JobMirror, client_factory: Any, settings: Settings
) -> JobInfo | None:
    """The job's Bull-style view, or None if no such job exists."""
    queue = queue_of(job_id)
    if queue is None:
        return None
    try:
        cached = await mirror.get(queue, job_id)
    except (RedisError, OSError):
        cached = None
    if cached is not None and cached.state != "unknown" and cached.company_id:
        return JobInfo(
            name=cached.name,
            data=cached.data,
            opts=cached.opts,
            jobId=job_id,
            queue=queue,
            companyId=cached.company_id,
            state=cached.state,
            progress=cached.progress,
            stage=cached.stage,
            result=cached.returnvalue,
            failedReason=cached.failed_reason,
            attemptsMade=cached.attempts_made,
            timestamp=cached.timestamp,
            processedOn=cached.processed_on,
            finishedOn=cached.finished_on,
            source="redis",
        )
    client: Client = await client_factory()
    return await job_from_temporal(client, queue, job_id, settings)


async def job_from_temporal(
    client: Client, queue: str, job_id: str, settings: Settings
) -> JobInfo | None:
    handle = client.get_workflow_handle(job_id)
    try:
        desc = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    company = desc.typed_search_attributes.get(COMPANY_ID) or ""
    started = _ms(desc.start_time)
    closed = _ms(desc.close_time)
    job = JobInfo(
        jobId=job_id,
        queue=queue,
        companyId=company,
        state="waiting",
        progress=0.0,
        timestamp=started,
        finishedOn=closed,
        source="temporal",
    )
    # Bull's attemptsMade: runs of this job id finished before this one (kept in the memo by
    # whoever started the run), plus this one once it has finished.
    before = int(await desc.memo_value("attemptsBefore", 0, type_hint=int))
    job.attemptsMade = before if desc.status == WorkflowExecutionStatus.RUNNING else before + 1
    if desc.status == WorkflowExecutionStatus.RUNNING:
        if desc.execution_time and desc.execution_time > datetime.now(UTC):
            job.state = "delayed"  # started with a start delay that has not elapsed
            return job
        await _running_state(client, handle, desc, job)
        if job.stage not in ("completed", "failed"):
            return job
        # The workflow is recording its outcome and closes in a moment: wait for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(_wait_closed(handle)), QUERY_TIMEOUT_S)
        desc = await handle.describe()
        job.finishedOn = _ms(desc.close_time)
    if desc.status == WorkflowExecutionStatus.RUNNING:
        pass
    elif desc.status == WorkflowExecutionStatus.COMPLETED:
        job.state, job.progress, job.stage = "completed", 100.0, "completed"
        job.result = public_result(await handle.result(), settings, company)
    else:
        job.state = "failed"
        job.failedReason = public_text(
            await _failure_reason(handle, desc.status), settings, company
        )
    return job


async def _running_state(client: Client, handle: Any, desc: Any, job: JobInfo) -> None:
    pending = [
        a
        for a in desc.raw_description.pending_activities
        if a.activity_type.name != STATUS_ACTIVITY
    ]
    try:
        progress = await asyncio.wait_for(handle.query(JobWorkflow.progress), QUERY_TIMEOUT_S)
        job.stage, job.progress = progress.stage, progress.progress
    except (TimeoutError, RPCError):
        job.stage = pending[0].activity_type.name if pending else "waiting"
    if job.stage == "paused":
        job.state = "paused"
    else:
        job.state = "waiting" if job.stage == "waiting" and not pending else "active"
    for activity in pending:
        if activity.heartbeat_details.payloads:
            details = (await client.data_converter.decode(activity.heartbeat_details.payloads))[0]
            if isinstance(details, dict) and details.get("total"):
                job.progress = round(5.0 + 90.0 * details["step"] / details["total"], 1)
                job.detail = to_wire(details)


async def _failure_reason(handle: Any, status: WorkflowExecutionStatus | None) -> str:
    if status == WorkflowExecutionStatus.CANCELED:
        return "cancelled"
    if status == WorkflowExecutionStatus.TERMINATED:
        return "terminated"
    if status == WorkflowExecutionStatus.TIMED_OUT:
        return "timed out"
    try:
        await handle.result()
    except WorkflowFailureError as exc:
        cause = exc.cause
        return str(getattr(cause, "message", None) or cause or exc)
    return str(status)


async def _wait_closed(handle: Any) -> None:
    with contextlib.suppress(Exception):
        await handle.result()


def _ms(ts: Any) -> int | None:
    return int(ts.timestamp() * 1000) if ts else None
