"""Job status, the way Bull users query it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status

from api.deps import CurrentPrincipal, MirrorDep, get_temporal
from api.job_status import find_job
from api.schemas import Job

router = APIRouter(prefix="/api/ai/jobs", tags=["jobs"])


@router.get("/{job_id}")
async def get_job(
    job_id: str, request: Request, principal: CurrentPrincipal, mirror: MirrorDep
) -> Job:
    """State, progress, result or failure reason of one job."""
    job = await find_job(job_id, mirror, lambda: get_temporal(request))
    # Another tenant's job answers exactly like a missing one: no existence leak.
    if job is None or not principal.may_act_for(job.companyId):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' not found")
    return job
