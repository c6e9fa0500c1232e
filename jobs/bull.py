"""Bull-style queues over the job front door: the same calls the old Bull.js code made.

    queue = get_training_queue()
    job = await queue.get_job(job_id)
    await job.get_state(); await job.progress(); await job.finished(); await job.retry()
    await queue.get_job_counts(); await queue.pause(); await queue.resume()
    await queue.clean(grace_ms, limit, "completed")

A view of `JobService`: every call is one of its verbs, so Bull users, the API and the CLI see
and change the same jobs the same way.
"""

from __future__ import annotations

from typing import Any

from jobs.errors import JobStateError
from jobs.read import JobInfo
from jobs.service import JobService, job_service
from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, Settings, get_settings
from tenanttune.vocab import JobState, queue_of

__all__ = ["Job", "JobStateError", "Queue", "get_deployment_queue", "get_training_queue"]


class Job:
    """One job, Bull's Job API."""

    def __init__(self, queue: Queue, info: JobInfo) -> None:
        self.queue = queue
        self.info = info

    @property
    def id(self) -> str:
        return self.info.jobId

    @property
    def data(self) -> Any:
        return self.info.data

    async def refresh(self) -> JobInfo:
        found = await self.queue.job_info(self.id)
        if found is not None:
            self.info = found
        return self.info

    async def get_state(self) -> str:
        """Bull's getState: from the mirror's collections alone (one round trip); from Temporal
        when Redis is unreachable or does not know the job."""
        state = await self.queue.jobs.state(self.id)
        if state is not None:
            self.info.state = state
        return self.info.state

    async def progress(self) -> float:
        return (await self.refresh()).progress

    async def finished(self, timeout_s: float | None = None) -> Any:
        """Wait for the job's result; raise JobStateError with the reason if it failed."""
        self.info = await self.queue.jobs.wait(self.id, timeout_s)
        if self.info.state != JobState.COMPLETED:
            raise JobStateError(f"job {self.id} failed: {self.info.failedReason}")
        return self.info.result

    async def retry(self) -> None:
        await self.queue.jobs.retry(self.id)

    async def cancel(self) -> None:
        await self.queue.jobs.cancel(self.id)


class Queue:
    """One Bull queue (`model-training` or `model-deployment`)."""

    def __init__(self, name: str, jobs: JobService) -> None:
        self.name = name
        self.jobs = jobs

    async def job_info(self, job_id: str) -> JobInfo | None:
        if queue_of(job_id) != self.name:
            return None
        return await self.jobs.get(job_id)

    async def get_job(self, job_id: str) -> Job | None:
        info = await self.job_info(job_id)
        return Job(self, info) if info else None

    async def get_jobs(
        self, company_id: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobInfo]:
        return await self.jobs.list_jobs(self.name, company_id, state, limit)

    async def retry(self, job_id: str) -> None:
        await self.jobs.retry(job_id)

    async def cancel(self, job_id: str) -> None:
        await self.jobs.cancel(job_id)

    async def get_job_counts(self) -> dict[str, int]:
        return await self.jobs.counts(self.name)

    async def is_paused(self) -> bool:
        return await self.jobs.is_paused(self.name)

    async def pause(self) -> None:
        await self.jobs.pause(self.name)

    async def resume(self) -> int:
        return await self.jobs.resume(self.name)

    async def clean(self, grace_ms: int, limit: int, state: str = "completed") -> list[str]:
        return await self.jobs.clean(self.name, grace_ms, limit, state)


def get_training_queue(settings: Settings | None = None) -> Queue:
    return Queue(TRAINING_QUEUE, job_service(settings or get_settings()))


def get_deployment_queue(settings: Settings | None = None) -> Queue:
    return Queue(DEPLOYMENT_QUEUE, job_service(settings or get_settings()))
