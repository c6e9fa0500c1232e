"""Bull-style queues over Temporal: the same calls the old Bull.js code made.

    queue = get_training_queue()
    job = await queue.get_job(job_id)
    await job.get_state(); await job.progress(); await job.finished(); await job.retry()
    await queue.get_job_counts(); await queue.pause(); await queue.resume()
    await queue.clean(grace_ms, limit, "completed")

Reads go to the Redis mirror first and to Temporal when Redis misses or is down; every change
(pause, retry, cancel) goes to Temporal, the source of truth. The API uses the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from tenanttune.jobs import JOB_KIND, JobState, control_workflow_id, queue_of
from tenanttune.mirror import JobMirror
from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, Settings, get_settings
from tenanttune.status_read import JobInfo, find_job, job_from_temporal
from tenanttune.temporal import COMPANY_ID, connect, job_start_metadata, queue_control_metadata
from tenanttune.types import DeployRequest, QueueState, TrainRequest

ClientFactory = Callable[[], Awaitable[Client]]
FINISHED = (JobState.COMPLETED, JobState.FAILED)
_FAILED_STATUSES = ("Failed", "Canceled", "Terminated", "TimedOut")


class JobStateError(Exception):
    """The job is not in a state that allows this (e.g. retrying a running job)."""


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
        with contextlib.suppress(RedisError, OSError):
            state = await self.queue.mirror.state_of(self.queue.name, self.id)
            if state is not None:
                self.info.state = state
                return state
        return (await self.refresh()).state

    async def progress(self) -> float:
        return (await self.refresh()).progress

    async def finished(self, timeout_s: float | None = None) -> Any:
        """Wait for the job's result; raise JobStateError with the reason if it failed."""
        client = await self.queue.client()
        handle = client.get_workflow_handle(self.id)
        try:
            await asyncio.wait_for(_settle(handle), timeout_s)
        finally:
            await self.refresh()
        info = self.info
        if info.state != JobState.COMPLETED:
            raise JobStateError(f"job {self.id} failed: {info.failedReason}")
        return info.result

    async def retry(self) -> None:
        await self.queue.retry(self.id)

    async def cancel(self) -> None:
        await self.queue.cancel(self.id)


async def _settle(handle: Any) -> None:
    with contextlib.suppress(Exception):
        await handle.result()


class Queue:
    """One Bull queue (`model-training` or `model-deployment`) backed by Temporal."""

    def __init__(self, name: str, mirror: JobMirror, client: ClientFactory) -> None:
        self.name = name
        self.mirror = mirror
        self._client = client

    async def client(self) -> Client:
        return await self._client()

    # --- jobs -------------------------------------------------------------------------------

    async def job_info(self, job_id: str) -> JobInfo | None:
        if queue_of(job_id) != self.name:
            return None
        return await find_job(job_id, self.mirror, self._client)

    async def get_job(self, job_id: str) -> Job | None:
        info = await self.job_info(job_id)
        return Job(self, info) if info else None

    async def get_jobs(
        self, company_id: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobInfo]:
        """A tenant's newest jobs (all tenants' when company_id is None), optionally by state."""
        try:
            if company_id is None:
                raise LookupError  # the mirror indexes by tenant; ask Temporal for all
            ids = await self.mirror.company_jobs(
                self.name, company_id, limit * 4 if state else limit
            )
            infos = [await find_job(i, self.mirror, self._client) for i in ids]
            found = [i for i in infos if i is not None]
        except (RedisError, OSError, LookupError):
            found = await self._list_from_temporal(company_id, limit * 4 if state else limit)
        if state:
            found = [i for i in found if i.state == state]
        return found[:limit]

    async def _list_from_temporal(self, company_id: str | None, limit: int) -> list[JobInfo]:
        client = await self.client()
        query = f"JobKind='{JOB_KIND[self.name]}'"
        if company_id:
            query += f" AND CompanyId='{company_id}'"
        out = []
        async for wf in client.list_workflows(query, limit=limit):
            info = await job_from_temporal(client, self.name, wf.id)
            if info is not None:
                out.append(info)
        return out

    async def retry(self, job_id: str) -> None:
        """Run a failed job again: a new run under the same job id; attemptsMade grows."""
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        try:
            desc = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise JobStateError(f"job {job_id} not found") from exc
            raise
        if desc.status == WorkflowExecutionStatus.RUNNING:
            raise JobStateError(f"job {job_id} is still running; only failed jobs can be retried")
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            raise JobStateError(f"job {job_id} completed; only failed jobs can be retried")
        arg = await _original_input(client, handle, self.name)
        arg = replace(
            arg, options=replace(arg.options, attempts_before=arg.options.attempts_before + 1)
        )
        company = desc.typed_search_attributes.get(COMPANY_ID) or arg.company_id
        # Back to waiting in the mirror first (only from failed, so a second retry racing
        # this one cannot overwrite the new run's state); undone if the start fails.
        run = _workflow_run(self.name)
        moved = False
        with contextlib.suppress(RedisError, OSError):
            if await self.mirror.state_of(self.name, job_id) == JobState.FAILED:
                moved = await self.mirror.move(
                    self.name,
                    job_id,
                    JobState.WAITING,
                    {
                        "failedReason": "",
                        "finishedOn": "",
                        "progress": 0,
                        "attemptsMade": arg.options.attempts_before,
                    },
                    company_id=company,
                )
                if moved:  # the new run's event stream starts empty, not with the old failure
                    await self.mirror.redis.delete(self.mirror.events_key(self.name, job_id))
        try:
            await client.start_workflow(
                run,
                arg,
                id=job_id,
                task_queue=self.name,
                **job_start_metadata(arg),
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                memo={"attemptsBefore": arg.options.attempts_before},
                priority=Priority(priority_key=arg.options.priority)
                if arg.options.priority
                else Priority(),
            )
        except (WorkflowAlreadyStartedError, RPCError) as exc:
            if moved:
                with contextlib.suppress(RedisError, OSError):
                    await self.mirror.move(self.name, job_id, JobState.FAILED, company_id=company)
            if isinstance(exc, WorkflowAlreadyStartedError):
                raise JobStateError(f"job {job_id} is already running again") from exc
            raise

    async def cancel(self, job_id: str) -> None:
        """Cancel a waiting or running job; it ends as failed with reason 'cancelled'."""
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        desc = await handle.describe()
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise JobStateError(f"job {job_id} has already finished")
        await handle.cancel()

    # --- queue ------------------------------------------------------------------------------

    async def get_job_counts(self) -> dict[str, int]:
        """Jobs per Bull state (from the mirror; from Temporal's visibility without Redis)."""
        try:
            return await self.mirror.counts(self.name)
        except (RedisError, OSError):
            pass
        client = await self.client()
        kind = f"JobKind='{JOB_KIND[self.name]}'"
        running = (await client.count_workflows(f"{kind} AND ExecutionStatus='Running'")).count
        completed = (await client.count_workflows(f"{kind} AND ExecutionStatus='Completed'")).count
        failed = 0
        for status in _FAILED_STATUSES:
            failed += (await client.count_workflows(f"{kind} AND ExecutionStatus='{status}'")).count
        return {
            "waiting": 0,
            "active": running,
            "paused": 0,
            "delayed": 0,
            "completed": completed,
            "failed": failed,
        }

    async def is_paused(self) -> bool:
        client = await self.client()
        try:
            return bool(
                await client.get_workflow_handle(control_workflow_id(self.name)).query(
                    "paused", result_type=bool
                )
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise

    async def pause(self) -> None:
        """New jobs stop starting (they show `paused`); running jobs finish."""
        await self._switch("pause")

    async def resume(self) -> int:
        """Let paused jobs go, oldest first; returns how many running jobs were released."""
        await self._switch("resume")
        client = await self.client()
        held = [
            wf
            async for wf in client.list_workflows(
                f"JobKind='{JOB_KIND[self.name]}' AND ExecutionStatus='Running'"
            )
        ]
        held.sort(key=lambda wf: wf.start_time)
        for wf in held:
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(wf.id).signal("release")
        return len(held)

    async def _switch(self, signal: str) -> None:
        client = await self.client()
        await client.start_workflow(
            "QueueControlWorkflow",
            QueueState(queue=self.name),
            id=control_workflow_id(self.name),
            task_queue=self.name,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal=signal,
            **queue_control_metadata(self.name),
        )

    async def clean(self, grace_ms: int, limit: int, state: str = "completed") -> list[str]:
        """Forget finished jobs older than `grace_ms` in the mirror, keeping the newest `limit`."""
        return await self.mirror.clean(self.name, JobState(state), grace_ms, limit)


async def _original_input(client: Client, handle: Any, queue: str) -> TrainRequest | DeployRequest:
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        kind: type[TrainRequest] | type[DeployRequest] = (
            TrainRequest if queue == TRAINING_QUEUE else DeployRequest
        )
        (arg,) = await client.data_converter.decode(payloads, [kind])
        return arg  # type: ignore[no-any-return]
    raise JobStateError("the job's history has no start event")


def _workflow_run(queue: str) -> Any:
    # Imported here: the core does not import workflows at module load (layering).
    from workflows.deployment import DeploymentWorkflow
    from workflows.training import TrainingWorkflow

    return TrainingWorkflow.run if queue == TRAINING_QUEUE else DeploymentWorkflow.run


async def rebuild_cache(client: Client, mirror: JobMirror) -> int:
    """Rebuild the mirror from Temporal's visibility (e.g. after a Redis flush)."""
    restored = 0
    for queue in (TRAINING_QUEUE, DEPLOYMENT_QUEUE):
        async for wf in client.list_workflows(f"JobKind='{JOB_KIND[queue]}'"):
            info = await job_from_temporal(client, queue, wf.id)
            if info is None:
                continue
            fields: dict[str, Any] = {
                "name": "train" if queue == TRAINING_QUEUE else "deploy",
                "companyId": info.companyId,
                "progress": info.progress,
                "stage": info.stage,
                "timestamp": info.timestamp,
                "finishedOn": info.finishedOn,
                "returnvalue": info.result,
                "failedReason": info.failedReason,
                "attemptsMade": info.attemptsMade,
            }
            score = info.finishedOn or info.timestamp
            await mirror.move(
                queue, wf.id, JobState(info.state), fields, company_id=info.companyId, score=score
            )
            restored += 1
    return restored


_queues: dict[str, Queue] = {}


def _queue(name: str, settings: Settings | None) -> Queue:
    settings = settings or get_settings()
    if name not in _queues:
        client: Client | None = None

        async def factory() -> Client:
            nonlocal client
            if client is None:
                client = await connect(settings)
            return client

        mirror = JobMirror.from_url(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
        )
        _queues[name] = Queue(name, mirror, factory)
    return _queues[name]


def get_training_queue(settings: Settings | None = None) -> Queue:
    return _queue(TRAINING_QUEUE, settings)


def get_deployment_queue(settings: Settings | None = None) -> Queue:
    return _queue(DEPLOYMENT_QUEUE, settings)
