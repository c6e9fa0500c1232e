"""Connecting to Temporal with the configured address, namespace and credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, Interceptor
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import Runtime

from tenanttune.settings import Settings

COMPANY_ID = SearchAttributeKey.for_keyword("CompanyId")
JOB_KIND = SearchAttributeKey.for_keyword("JobKind")
MODEL_VERSION = SearchAttributeKey.for_keyword("ModelVersion")
# Every search attribute a job carries; a Temporal server must have them registered.
SEARCH_ATTRIBUTES = (COMPANY_ID, JOB_KIND, MODEL_VERSION)


class TemporalUnavailable(Exception):
    """Temporal cannot be reached right now."""


class TemporalConnector:
    """Connects on first use and reconnects after a failure, so a process starts without
    Temporal and answers what it can until Temporal is back."""

    def __init__(self, settings: Settings, timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(connect(self.settings), self.timeout_s)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    raise TemporalUnavailable(
                        f"Temporal at {self.settings.temporal_address} is unreachable: {exc}"
                    ) from exc
            return self._client


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A client whose calls carry the caller's trace context into workflows and activities."""
    interceptors: Sequence[Interceptor] = [TracingInterceptor()]
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key,
        tls=settings.temporal_tls,
        interceptors=interceptors,
        runtime=runtime,
    )


def is_traced(client: Client) -> bool:
    return any(isinstance(i, TracingInterceptor) for i in client.config()["interceptors"])


async def pollers(client: Client, queue: str) -> dict[str, list[str]]:
    """Identities of the workers polling a task queue, for workflow and activity tasks."""
    found: dict[str, list[str]] = {}
    for name, kind in (
        ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    ):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                task_queue_type=kind,
            ),
            timeout=timedelta(seconds=5),
        )
        found[name] = sorted({p.identity for p in response.pollers})
    return found


def job_search_attributes(company_id: str, kind: str, version: str = "") -> TypedSearchAttributes:
    """What the Web UI and `temporal workflow list --query` filter a tenant's jobs on."""
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(COMPANY_ID, company_id),
        SearchAttributePair(JOB_KIND, kind),
    ]
    if version:
        pairs.append(SearchAttributePair(MODEL_VERSION, version))
    return TypedSearchAttributes(pairs)


def job_start_metadata(arg: Any) -> dict[str, Any]:
    """Search attributes and the static summary/details a job's workflow is started with, so the
    Web UI shows what a job is without opening it and `temporal workflow list` can filter."""
    company = arg.company_id
    if hasattr(arg, "model_name"):  # a DeployRequest
        attributes = job_search_attributes(company, "deployment", version=arg.version)
        summary = f"deploy {arg.model_name} for {company}"
        details = (
            f"**model** `{arg.model_name}`  \n**source** `{arg.model_path}`  \n"
            f"**target** {arg.target} ({arg.outtype}{', ' + arg.quantize if arg.quantize else ''})"
        )
    else:
        hp = arg.hyperparameters
        attributes = job_search_attributes(company, "training")
        summary = (
            f"train {company}: {hp.epochs} epochs, lr {hp.learning_rate}, LoRA r{hp.lora_r}"
            + (", then deploy" if arg.auto_deploy else "")
        )
        details = (
            f"**base** `{arg.base_model or 'tiny local model'}`  \n"
            f"**batch** {hp.batch_size} x {hp.grad_accum}, max length {hp.max_seq_len}  \n"
            f"**modules** {', '.join(hp.target_modules)}  \n**version** {arg.version or arg.job_id}"
        )
    return {"search_attributes": attributes, "static_summary": summary, "static_details": details}


def queue_control_metadata(queue: str) -> dict[str, Any]:
    """A queue's pause switch, told apart from jobs in the Web UI (`JobKind='queue'`)."""
    return {
        "search_attributes": TypedSearchAttributes([SearchAttributePair(JOB_KIND, "queue")]),
        "static_summary": f"paused/resumed switch of the {queue} queue",
    }
