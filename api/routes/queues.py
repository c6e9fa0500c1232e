"""Queue control for operators (admin tokens): counts, pause, resume, clean."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status

from api.deps import CurrentPrincipal, get_jobs
from api.schemas import CleanBody, Cleaned, QueueAction
from jobs.bull import Queue
from tenanttune.auth import Principal
from tenanttune.settings import QUEUES

router = APIRouter(prefix="/api/ai/queues", tags=["queues"])


def require_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "queue control needs an admin token")
    return principal


def _queue(
    request: Request,
    queue: Annotated[str, Path(description=f"one of {', '.join(QUEUES)}")],
    _: Annotated[Principal, Depends(require_admin)],
) -> Queue:
    if queue not in QUEUES:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no queue '{queue}'; queues: {QUEUES}")
    return Queue(queue, get_jobs(request))


QueueDep = Annotated[Queue, Depends(_queue)]


@router.get("/{queue}/counts")
async def counts(queue: QueueDep) -> dict[str, int]:
    """Jobs per state (Bull's getJobCounts)."""
    return await queue.get_job_counts()


@router.post("/{queue}/pause")
async def pause(queue: QueueDep) -> QueueAction:
    """New jobs stop starting and show `paused`; running jobs finish."""
    await queue.pause()
    return QueueAction(queue=queue.name, paused=True, message="queue paused")


@router.post("/{queue}/resume")
async def resume(queue: QueueDep) -> QueueAction:
    """Paused jobs start again, oldest first."""
    released = await queue.resume()
    return QueueAction(
        queue=queue.name, paused=False, message=f"queue resumed; {released} running jobs signalled"
    )


@router.post("/{queue}/clean")
async def clean(queue: QueueDep, body: CleanBody) -> Cleaned:
    """Forget finished jobs older than `grace` ms, keeping the newest `limit` (Bull's clean)."""
    removed = await queue.clean(body.grace, body.limit, body.state)
    return Cleaned(queue=queue.name, state=body.state, removed=removed)
