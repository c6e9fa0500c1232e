"""The job front door: the only code that starts, reads, retries, cancels, pauses and cleans jobs.

Every entry point (the HTTP routes, the CLI, selftest, the Bull facade) calls a `JobService`;
none builds its own workflow options, search attributes or mirror entries. `_start` is the one
place a job workflow is started; the initial mirror entry and its undo live beside it.

Reads go to the Redis mirror first and to Temporal when Redis misses or is down; every change
goes to Temporal, the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from jobs import admission
from jobs.errors import (
    InvalidReference,
    JobNotFound,
    JobQueueUnavailable,
    JobStateError,
)
from jobs.model_paths import ModelPathError, manifest_of, resolve_model_path
from jobs.read import JobInfo, find_job, job_from_temporal
from tenanttune.mirror import JobMirror
from tenanttune.settings import DEPLOYMENT_QUEUE, QUEUES, TRAINING_QUEUE, Settings
from tenanttune.temporal import (
    COMPANY_ID,
    TemporalUnavailable,
    job_start_metadata,
    queue_control_metadata,
)
from tenanttune.types import DeployRequest, JobOptions, QueueState, TrainRequest
from tenanttune.vocab import (
    JOB_KIND,
    JobState,
    control_workflow_id,
    model_name,
    new_job_id,
    valid_tag,
)
from tenanttune.vocab import queue_of as queue_of_job
from training.base_model import short_name
from training.spec import TrainingHyperparameters
from training.train import TrainConfig
from workflows.common import JobWorkflow
from workflows.deployment import DeploymentWorkflow
from workflows.queue_control import QueueControlWorkflow
from workflows.training import TrainingWorkflow

ClientFactory = Callable[[], Awaitable[Client]]
_FAILED_STATUSES = ("Failed", "Canceled", "Terminated", "TimedOut")


@dataclass
class RequestedOptions:
    """Bull's job options as the caller sent them; None means the server's default."""

    attempts: int | None = None
    backoff_type: str | None = None
    backoff_delay_ms: int | None = None
    delay_ms: int = 0
    priority: int = 0
    remove_on_complete: int = -1
    remove_on_fail: int = -1

    def resolve(self, attempts: int, backoff_delay_ms: int, plan_priority: int) -> JobOptions:
        """The options a job runs with; priority is the tenant's plan's unless an admin set it."""
        return JobOptions(
            attempts=self.attempts or attempts,
            backoff_type=self.backoff_type or "exponential",
            backoff_delay_ms=(
                self.backoff_delay_ms if self.backoff_delay_ms is not None else backoff_delay_ms
            ),
            delay_ms=self.delay_ms,
            priority=self.priority or plan_priority,
            remove_on_complete=self.remove_on_complete,
            remove_on_fail=self.remove_on_fail,
        )


@dataclass
class TrainSubmission:
    hyperparameters: TrainingHyperparameters = field(default_factory=TrainingHyperparameters)
    options: RequestedOptions = field(default_factory=RequestedOptions)
    base_model: str | None = None  # None: the server's BASE_MODEL
    version: str = ""  # default: the job id
    auto_deploy: bool = False
    deploy_version: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # Bull's job.data, as sent
    opts: dict[str, Any] = field(default_factory=dict)  # Bull's job.opts, as sent


@dataclass
class DeploySubmission:
    model_path: str
    version: str
    outtype: str | None = None
    quantize: str | None = None
    options: RequestedOptions = field(default_factory=RequestedOptions)
    data: dict[str, Any] = field(default_factory=dict)
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainAccepted:
    job_id: str
    dataset_size: int
    quality_score: float


@dataclass
class DeployAccepted:
    job_id: str
    model_name: str


@dataclass
class ManualTraining:
    """What to run by hand when the job queue is down: the data is exported, the config written."""

    command: str
    data_path: str
    config_path: str


class JobService:
    def __init__(self, settings: Settings, mirror: JobMirror, client: ClientFactory) -> None:
        self.settings = settings
        self.mirror = mirror
        self._client = client

    async def client(self) -> Client:
        try:
            return await self._client()
        except TemporalUnavailable as exc:
            raise JobQueueUnavailable(str(exc), 5) from exc

    # --- starting jobs ------------------------------------------------------------------------

    async def train(
        self, company_id: str, sub: TrainSubmission, key: str | None = None
    ) -> TrainAccepted:
        """Check the tenant's data and the caps, then queue a LoRA fine-tuning job."""
        s = self.settings
        report, examples = await admission.usable_training_data(s, company_id)
        base_model = admission.allowed_base(s, sub.base_model)
        await admission.check_training_caps(s, sub.hyperparameters, examples, base_model)
        await self.client()  # Temporal down: refuse before an id or a mirror entry exists
        job_id = new_job_id(TRAINING_QUEUE, company_id, key, s.idempotency_key_secret)
        req = TrainRequest(
            job_id=job_id,
            company_id=company_id,
            hyperparameters=sub.hyperparameters,
            base_model=base_model,
            version=sub.version,
            train_timeout_s=s.train_timeout_s,
            heartbeat_timeout_s=s.train_heartbeat_timeout_s,
            save_steps=s.train_save_steps,
            auto_deploy=sub.auto_deploy,
            deploy_version=sub.deploy_version,
            deploy_target=s.deploy_target,
            options=sub.options.resolve(
                attempts=2, backoff_delay_ms=5000, plan_priority=s.limit(company_id, "priority")
            ),
            deploy_outtype=s.gguf_outtype,
            deploy_quantize=s.ollama_quantize,
            deploy_options=self._deploy_defaults(),
            deploy_heartbeat_timeout_s=s.deploy_heartbeat_timeout_s,
        )
        await self._enqueue(TRAINING_QUEUE, req, TrainingWorkflow.run, sub.data, sub.opts)
        return TrainAccepted(job_id, report.usable, report.quality_score)

    async def deploy(
        self, company_id: str, sub: DeploySubmission, key: str | None = None
    ) -> DeployAccepted:
        """Queue a job that converts a trained model to GGUF, publishes it and checks it answers."""
        s = self.settings
        if not valid_tag(sub.version):
            raise InvalidReference(
                "version must be a valid model tag: 1-128 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-'"
            )
        try:
            path = resolve_model_path(sub.model_path, s.models_dir, company_id)
        except ModelPathError as exc:
            raise InvalidReference(str(exc)) from exc
        manifest = manifest_of(path)
        base = manifest.get("base_model") or s.base_model or str(s.tiny_base_dir)
        name = model_name(short_name(str(base)), company_id, sub.version)
        job_id = new_job_id(DEPLOYMENT_QUEUE, company_id, key, s.idempotency_key_secret)
        req = DeployRequest(
            job_id=job_id,
            company_id=company_id,
            model_path=str(path),
            version=sub.version,
            model_name=name,
            target=s.deploy_target,
            outtype=sub.outtype or s.gguf_outtype,
            quantize=sub.quantize or s.ollama_quantize,
            source_job=str(manifest.get("job_id", "")),
            options=sub.options.resolve(
                attempts=s.deploy_max_attempts,
                backoff_delay_ms=int(s.deploy_retry_initial_s * 1000),
                plan_priority=s.limit(company_id, "priority"),
            ),
            heartbeat_timeout_s=s.deploy_heartbeat_timeout_s,
        )
        await self._enqueue(DEPLOYMENT_QUEUE, req, DeploymentWorkflow.run, sub.data, sub.opts)
        return DeployAccepted(job_id, name)

    def _deploy_defaults(self) -> JobOptions:
        return JobOptions(
            attempts=self.settings.deploy_max_attempts,
            backoff_delay_ms=int(self.settings.deploy_retry_initial_s * 1000),
        )

    async def _enqueue(
        self,
        queue: str,
        req: TrainRequest | DeployRequest,
        run: Any,
        data: dict[str, Any],
        opts: dict[str, Any],
    ) -> None:
        """Mirror the job as waiting (or delayed) under the tenant's quota, then start it.

        One job id never runs twice: a running job is answered as it is (conflict policy), and
        a finished one is not started again (reuse policy) — retry has its own verb.
        """
        client = await self.client()
        options, company = req.options, req.company_id
        added = False
        known = None
        with contextlib.suppress(RedisError, OSError):
            known = await self.mirror.state_of(queue, req.job_id)
        # The same idempotency key again is an answer, not a new job: it takes no quota and no
        # turn in the tenant's lock (a storm of retries of one request must not queue behind
        # itself and time out); the start below still makes sure the workflow exists.
        if known is None:
            async with admission.tenant_lock(self.mirror, company):
                existing = None
                with contextlib.suppress(RedisError, OSError):
                    existing = await self.mirror.state_of(queue, req.job_id)
                if existing is None:
                    await admission.check_job_quota(self.settings, self.mirror, client, company)
                with contextlib.suppress(RedisError, OSError):
                    added = await self.mirror.add(
                        queue,
                        req.job_id,
                        name="train" if queue == TRAINING_QUEUE else "deploy",
                        company_id=company,
                        data=data,
                        opts=opts,
                        delay_ms=options.delay_ms,
                        priority=options.priority,
                    )
        try:
            await self._start_job(
                run,
                req,
                queue=queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                start_delay=timedelta(milliseconds=options.delay_ms) if options.delay_ms else None,
            )
        except WorkflowAlreadyStartedError:
            # The same key after the job finished: the answer is that job. An entry just added
            # for it would claim it is waiting; Temporal answers for it instead.
            if added:
                await self._forget(queue, req.job_id)
        except RPCError as exc:
            if added:
                await self._forget(queue, req.job_id)
            raise JobQueueUnavailable(f"could not queue the job: {exc.message}", 5) from exc

    async def _start_job(
        self, run: Any, req: TrainRequest | DeployRequest, *, queue: str, **options: Any
    ) -> None:
        """Start a job's workflow: its id, queue, search attributes and Web UI summary, Bull's
        attempts-so-far in the memo, its priority."""
        await self._start(
            run,
            req,
            id=req.job_id,
            queue=queue,
            **job_start_metadata(req),
            memo={"attemptsBefore": req.options.attempts_before},
            priority=(
                Priority(priority_key=req.options.priority) if req.options.priority else Priority()
            ),
            **options,
        )

    async def _start(self, run: Any, arg: Any, *, id: str, queue: str, **options: Any) -> None:  # noqa: A002
        """The one call that starts a workflow (jobs, and the queues' pause switches)."""
        client = await self.client()
        await client.start_workflow(run, arg, id=id, task_queue=queue, **options)

    async def _forget(self, queue: str, job_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.mirror.remove(queue, job_id)

    async def retry(self, job_id: str) -> None:
        """Run a failed job again: a new run under the same job id; attemptsMade grows.

        The tenant's quota is checked and the job moved back to waiting under one lock, so
        concurrent retries cannot slip past the quota together.
        """
        queue = self._queue_of(job_id)
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        try:
            desc = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise JobNotFound(f"job '{job_id}' not found") from exc
            raise
        if desc.status == WorkflowExecutionStatus.RUNNING:
            raise JobStateError(f"job {job_id} is still running; only failed jobs can be retried")
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            raise JobStateError(f"job {job_id} completed; only failed jobs can be retried")
        arg = await _original_input(client, handle, queue)
        arg = replace(
            arg, options=replace(arg.options, attempts_before=arg.options.attempts_before + 1)
        )
        company = desc.typed_search_attributes.get(COMPANY_ID) or arg.company_id
        run = TrainingWorkflow.run if queue == TRAINING_QUEUE else DeploymentWorkflow.run
        moved = False
        async with admission.tenant_lock(self.mirror, company):
            await admission.check_job_quota(self.settings, self.mirror, client, company)
            # Back to waiting first (only from failed, so a second retry racing this one cannot
            # overwrite the new run's state); undone if the start fails.
            with contextlib.suppress(RedisError, OSError):
                moved = await self.mirror.requeue_failed(
                    queue, job_id, company, attempts_made=arg.options.attempts_before
                )
            try:
                await self._start_job(
                    run,
                    arg,
                    queue=queue,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                )
            except (WorkflowAlreadyStartedError, RPCError) as exc:
                if moved:
                    with contextlib.suppress(RedisError, OSError):
                        await self.mirror.move(queue, job_id, JobState.FAILED, company_id=company)
                if isinstance(exc, WorkflowAlreadyStartedError):
                    raise JobStateError(f"job {job_id} is already running again") from exc
                raise JobQueueUnavailable(f"could not queue the job: {exc.message}", 5) from exc

    async def cancel(self, job_id: str) -> None:
        """Cancel a waiting or running job; it ends as failed with reason 'cancelled'."""
        self._queue_of(job_id)
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        try:
            desc = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise JobNotFound(f"job '{job_id}' not found") from exc
            raise
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise JobStateError(f"job {job_id} has already finished")
        await handle.cancel()

    # --- reading jobs -------------------------------------------------------------------------

    def _queue_of(self, job_id: str) -> str:
        queue = queue_of_job(job_id)
        if queue is None:
            raise JobNotFound(f"job '{job_id}' not found")
        return queue

    async def get(self, job_id: str) -> JobInfo | None:
        """The job's Bull-style view (state, progress, result in the wire format), or None."""
        return await find_job(job_id, self.mirror, self.client, self.settings)

    async def state(self, job_id: str) -> str | None:
        """Bull's getState: from the mirror alone (one round trip) when it knows the job."""
        queue = queue_of_job(job_id)
        if queue is None:
            return None
        with contextlib.suppress(RedisError, OSError):
            state = await self.mirror.state_of(queue, job_id)
            if state is not None:
                return state
        info = await self.get(job_id)
        return info.state if info else None

    async def list_jobs(
        self, queue: str, company_id: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobInfo]:
        """A tenant's newest jobs (all tenants' when company_id is None), optionally by state."""
        want = limit * 4 if state else limit
        try:
            if company_id is None:
                raise LookupError  # the mirror indexes by tenant; ask Temporal for all
            ids = await self.mirror.company_jobs(queue, company_id, want)
            infos = [await self.get(i) for i in ids]
            found = [i for i in infos if i is not None]
        except (RedisError, OSError, LookupError):
            found = await self._list_from_temporal(queue, company_id, want)
        if state:
            found = [i for i in found if i.state == state]
        return found[:limit]

    async def _list_from_temporal(
        self, queue: str, company_id: str | None, limit: int
    ) -> list[JobInfo]:
        client = await self.client()
        query = f"JobKind='{JOB_KIND[queue]}'"
        if company_id:
            query += f" AND CompanyId='{company_id}'"
        out = []
        async for wf in client.list_workflows(query, limit=limit):
            info = await job_from_temporal(client, queue, wf.id, self.settings)
            if info is not None:
                out.append(info)
        return out

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobInfo:
        """Wait until the job has finished (completed or failed) and return its view."""
        client = await self.client()
        handle = client.get_workflow_handle(job_id)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.result(), timeout_s)
        info = await self.get(job_id)
        if info is None:
            raise JobNotFound(f"job '{job_id}' not found")
        return info

    async def events(
        self, job_id: str, after: str = "0-0", count: int = 500
    ) -> list[tuple[str, dict[str, Any]]]:
        """The job's progress events after stream id `after` (raises RedisError without Redis)."""
        return await self.mirror.events(self._queue_of(job_id), job_id, after, count)

    # --- queues -------------------------------------------------------------------------------

    async def counts(self, queue: str) -> dict[str, int]:
        """Jobs per Bull state (from the mirror; from Temporal's visibility without Redis)."""
        try:
            return await self.mirror.counts(queue)
        except (RedisError, OSError):
            pass
        client = await self.client()
        kind = f"JobKind='{JOB_KIND[queue]}'"

        async def count(status: str) -> int:
            return (await client.count_workflows(f"{kind} AND ExecutionStatus='{status}'")).count

        failed = 0
        for status in _FAILED_STATUSES:
            failed += await count(status)
        return {
            "waiting": 0,
            "active": await count("Running"),
            "paused": 0,
            "delayed": 0,
            "completed": await count("Completed"),
            "failed": failed,
        }

    async def is_paused(self, queue: str) -> bool:
        client = await self.client()
        handle = client.get_workflow_handle_for(
            QueueControlWorkflow.run, control_workflow_id(queue)
        )
        try:
            return await handle.query(QueueControlWorkflow.paused)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise

    async def pause(self, queue: str) -> None:
        """New jobs stop starting (they show `paused`); running jobs finish."""
        await self._switch(queue, "pause")

    async def resume(self, queue: str) -> int:
        """Let paused jobs go, oldest first; returns how many running jobs were released."""
        await self._switch(queue, "resume")
        client = await self.client()
        held = [
            wf
            async for wf in client.list_workflows(
                f"JobKind='{JOB_KIND[queue]}' AND ExecutionStatus='Running'"
            )
        ]
        held.sort(key=lambda wf: wf.start_time)
        for wf in held:
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(wf.id).signal(JobWorkflow.release)
        return len(held)

    async def _switch(self, queue: str, signal: str) -> None:
        await self._start(
            QueueControlWorkflow.run,
            QueueState(queue=queue),
            id=control_workflow_id(queue),
            queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal=signal,
            **queue_control_metadata(queue),
        )

    async def clean(self, queue: str, grace_ms: int, limit: int, state: str) -> list[str]:
        """Forget finished jobs older than `grace_ms` in the mirror, keeping the newest `limit`."""
        return await self.mirror.clean(queue, JobState(state), grace_ms, limit)

    async def rebuild_cache(self) -> int:
        """Rebuild the mirror from Temporal's visibility (e.g. after a Redis flush)."""
        client = await self.client()
        restored = 0
        for queue in QUEUES:
            async for wf in client.list_workflows(f"JobKind='{JOB_KIND[queue]}'"):
                info = await job_from_temporal(client, queue, wf.id, self.settings)
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
                await self.mirror.move(
                    queue,
                    wf.id,
                    JobState(info.state),
                    fields,
                    company_id=info.companyId,
                    score=score,
                )
                restored += 1
        return restored

    # --- without a job queue --------------------------------------------------------------------

    async def manual_training(self, company_id: str, sub: TrainSubmission) -> ManualTraining:
        """Temporal is down: export the data and write the training config, to run by hand."""
        from training import dataset

        s = self.settings
        await admission.usable_training_data(s, company_id)
        admission.allowed_base(s, sub.base_model)
        train_file = s.data_dir / f"{company_id}-training.jsonl"
        eval_file = s.data_dir / f"{company_id}-validation.jsonl"
        await asyncio.to_thread(
            dataset.export,
            s.tenant_data_dir(company_id),
            [(train_file, eval_file)],
            max_example_chars=s.max_example_chars,
            validation_share=s.validation_share,
            min_examples=s.min_examples,
        )
        base = sub.base_model or s.base_model or str(s.tiny_base_dir)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        config = TrainConfig(
            base_model=base,
            train_file=str(train_file),
            eval_file=str(eval_file),
            output_dir=str(s.models_dir / company_id / f"manual-{stamp}"),
            hyperparameters=sub.hyperparameters,
            save_steps=s.train_save_steps,
        )
        config_path = s.data_dir / f"{company_id}-train-config.json"
        config_path.write_text(config.to_json())
        command = f"python -m training.train --config {shlex.quote(str(config_path))}"
        if not s.base_model and not sub.base_model:
            command = f"python -m training.base_model {shlex.quote(base)} && {command}"
        return ManualTraining(command, str(train_file), str(config_path))


async def _original_input(
    client: Client, handle: WorkflowHandle[Any, Any], queue: str
) -> TrainRequest | DeployRequest:
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        kind: type[TrainRequest] | type[DeployRequest] = (
            TrainRequest if queue == TRAINING_QUEUE else DeployRequest
        )
        (arg,) = await client.data_converter.decode(payloads, [kind])
        return arg  # type: ignore[no-any-return]
    raise JobStateError("the job's history has no start event")


_services: dict[int, JobService] = {}


def job_service(settings: Settings) -> JobService:
    """The process's JobService for these settings (the CLI and the Bull facade use it)."""
    key = id(settings)
    if key not in _services:
        from tenanttune.temporal import TemporalConnector

        mirror = JobMirror.from_url(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
        )
        _services[key] = JobService(settings, mirror, TemporalConnector(settings).get)
    return _services[key]
