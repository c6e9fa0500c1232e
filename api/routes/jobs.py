"""Jobs, the way Bull users query and control them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from api.deps import CurrentPrincipal, CurrentTenant, JobsDep
from api.schemas import Job, JobAction
from jobs.service import JobService
from tenanttune.settings import QUEUES
from tenanttune.vocab import JobState, company_of

router = APIRouter(prefix="/api/ai", tags=["jobs"])


async def own_job(job_id: str, jobs: JobService, principal: CurrentPrincipal) -> Job:
    """The caller's job; another tenant's job answers exactly like a missing one (no leak).

    The tenant is read from the job id before any lookup, so another tenant's ids are refused
    in the same time whether the job exists or not.
    """
    company = company_of(job_id)
    if company is None or not principal.may_act_for(company):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' not found")
    info = await jobs.get(job_id)
    if info is None or not principal.may_act_for(info.companyId):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' not found")
    return Job(**asdict(info))


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, jobs: JobsDep, principal: CurrentPrincipal) -> Job:
    """State, progress, result or failure reason of one job."""
    return await own_job(job_id, jobs, principal)


@router.post("/jobs/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED)
async def retry_job(job_id: str, jobs: JobsDep, principal: CurrentPrincipal) -> JobAction:
    """Run a failed job again (a new run under the same job id; attemptsMade grows)."""
    await own_job(job_id, jobs, principal)
    await jobs.retry(job_id)
    return JobAction(message="Job queued again", jobId=job_id, status="queued")


@router.post("/jobs/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_job(job_id: str, jobs: JobsDep, principal: CurrentPrincipal) -> JobAction:
    """Cancel a waiting or running job; a running training stops within seconds."""
    await own_job(job_id, jobs, principal)
    await jobs.cancel(job_id)
    return JobAction(message="Cancellation requested", jobId=job_id, status="cancelling")


@router.get("/models/{company_id}/jobs")
async def list_jobs(
    company_id: CurrentTenant,
    jobs: JobsDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[Job]:
    """The tenant's newest jobs of both queues, newest first."""
    found = []
    for queue in QUEUES:
        infos = await jobs.list_jobs(queue, company_id, state.value if state else None, limit)
        found += [Job(**asdict(i)) for i in infos]
    found.sort(key=lambda j: j.timestamp or 0, reverse=True)
    return found[:limit]
