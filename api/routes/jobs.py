"""Jobs, the way Bull users query and control them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from temporalio.service import RPCError

from api.deps import CurrentPrincipal, CurrentTenant, get_queue_for_job, get_queues, get_temporal
from api.limits import check_job_quota, tenant_submission_lock
from api.schemas import Job, JobAction
from tenanttune.jobs import JobState
from tenanttune.queues import JobStateError, Queue

router = APIRouter(prefix="/api/ai", tags=["jobs"])


async def _own_job(job_id: str, request: Request, principal: CurrentPrincipal) -> tuple[Queue, Job]:
    queue = get_queue_for_job(request, job_id)
    info = await queue.job_info(job_id) if queue else None
    # Another tenant's job answers exactly like a missing one: no existence leak.
    if queue is None or info is None or not principal.may_act_for(info.companyId):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' not found")
    return queue, Job(**asdict(info))


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, principal: CurrentPrincipal) -> Job:
    """State, progress, result or failure reason of one job."""
    _, job = await _own_job(job_id, request, principal)
    return job


@router.post("/jobs/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED)
async def retry_job(job_id: str, request: Request, principal: CurrentPrincipal) -> JobAction:
    """Run a failed job again (a new run under the same job id; attemptsMade grows)."""
    queue, job = await _own_job(job_id, request, principal)
    if job.state == "failed":  # a retry is one more unfinished job: the tenant's quota holds
        client = await get_temporal(request)
        async with tenant_submission_lock(queue.mirror, job.companyId):
            await check_job_quota(request.app.state.settings, queue.mirror, client, job.companyId)
    try:
        await queue.retry(job_id)
    except JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except RPCError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, exc.message) from exc
    return JobAction(message="Job queued again", jobId=job_id, status="queued")


@router.post("/jobs/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_job(job_id: str, request: Request, principal: CurrentPrincipal) -> JobAction:
    """Cancel a waiting or running job; a running training stops within seconds."""
    queue, _ = await _own_job(job_id, request, principal)
    try:
        await queue.cancel(job_id)
    except JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return JobAction(message="Cancellation requested", jobId=job_id, status="cancelling")


@router.get("/models/{company_id}/jobs")
async def list_jobs(
    company_id: CurrentTenant,
    request: Request,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[Job]:
    """The tenant's newest jobs of both queues, newest first."""
    jobs = []
    for queue in get_queues(request).values():
        infos = await queue.get_jobs(company_id, state.value if state else None, limit)
        jobs += [Job(**asdict(i)) for i in infos]
    jobs.sort(key=lambda j: j.timestamp or 0, reverse=True)
    return jobs[:limit]
