"""Traces, metrics and structured logs: OpenTelemetry spans, Prometheus series, JSON log lines.

Tracing: one SDK tracer provider per process; spans go to OTLP (HTTP) only when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set, but they always exist so log lines carry a trace id.
Temporal's `TracingInterceptor` (client and worker) carries the context from the API's request
span into the workflow and activity spans.

Metrics live in prometheus_client's default registry: the API serves them on `/metrics`, each
worker on `WORKER_METRICS_PORT` (with the Temporal SDK's own worker metrics alongside). Each is
mirrored by an OpenTelemetry instrument, exported over OTLP when the endpoint is set.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from tenanttune.settings import SLOT_QUEUES, Settings
from tenanttune.vocab import queue_of

log = logging.getLogger("tenanttune.activity")

# ---------------------------------------------------------------------------------- metrics

OTHER_TENANTS = "_other"

JOBS = Counter(
    "tenanttune_jobs",
    "Jobs finished, by queue, tenant (bounded, see METRICS_MAX_TENANTS) and outcome.",
    ["queue", "company_id", "outcome"],
)
JOB_SECONDS = Histogram(
    "tenanttune_job_duration_seconds",
    "Wall time of a job from its run's start to completed or failed.",
    ["queue", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf")),
)
STAGE_SECONDS = Histogram(
    "tenanttune_stage_duration_seconds",
    "Wall time of one activity attempt (a job's stage: export, train, convert, ...).",
    ["queue", "stage", "outcome"],
    buckets=(0.05, 0.25, 1, 5, 15, 30, 60, 300, 900, 3600, 21600, float("inf")),
)
ERRORS = Counter(
    "tenanttune_errors",
    "Failed activity attempts by stage and error type (ApplicationError type or class name).",
    ["queue", "stage", "error_type"],
)
QUEUE_JOBS = Gauge(
    "tenanttune_queue_jobs",
    "Jobs per queue and Bull state, read from the Redis mirror at scrape time.",
    ["queue", "state"],
)
MIRROR_UP = Gauge("tenanttune_mirror_up", "1 when the Redis mirror answered the last scrape.")

# The same series as OpenTelemetry instruments, exported over OTLP when an endpoint is set
# (no-ops otherwise). Prometheus stays the source for `/metrics`; these only mirror it.
_meter = metrics.get_meter("tenanttune")
_OTEL_JOBS = _meter.create_counter("tenanttune.vocab", "{job}", "Jobs finished")
_OTEL_JOB_SECONDS = _meter.create_histogram("tenanttune.job.duration", "s", "Job wall time")
_OTEL_STAGE_SECONDS = _meter.create_histogram(
    "tenanttune.stage.duration", "s", "Activity attempt wall time"
)
_OTEL_ERRORS = _meter.create_counter("tenanttune.errors", "{error}", "Failed activity attempts")
_OTEL_QUEUE_JOBS = _meter.create_gauge("tenanttune.queue.jobs", "{job}", "Jobs per queue and state")


class TenantLabels:
    """Caps the tenant label's cardinality: the first `limit` tenants a process sees keep their
    own label; later ones are counted under `_other` (0 turns the label off entirely)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, company_id: str) -> str:
        with self._lock:
            if company_id in self._seen:
                return company_id
            if len(self._seen) < self.limit:
                self._seen.add(company_id)
                return company_id
        return OTHER_TENANTS


_tenant_label = TenantLabels(100)


def configure_metrics(settings: Settings, service: str = "tenanttune") -> None:
    """The tenant label cap, and an OTLP metric exporter when an endpoint is configured."""
    global _tenant_label
    _tenant_label = TenantLabels(settings.metrics_max_tenants)
    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/")
    if endpoint and not isinstance(metrics.get_meter_provider(), MeterProvider):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        reader = PeriodicExportingMetricReader(OTLPMetricExporter(f"{endpoint}/v1/metrics"))
        resource = Resource.create({"service.name": settings.otel_service_name or service})
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))


def record_job_finished(
    queue: str, company_id: str, outcome: str, duration_s: float | None
) -> None:
    """Count a finished job and observe its duration (called where the final state is mirrored)."""
    tenant = _tenant_label(company_id or "unknown")
    JOBS.labels(queue, tenant, outcome).inc()
    _OTEL_JOBS.add(1, {"queue": queue, "company_id": tenant, "outcome": outcome})
    if duration_s is not None and duration_s >= 0:
        JOB_SECONDS.labels(queue, outcome).observe(duration_s)
        _OTEL_JOB_SECONDS.record(duration_s, {"queue": queue, "outcome": outcome})


def set_queue_counts(queue: str, counts: dict[str, int]) -> None:
    for state, n in counts.items():
        QUEUE_JOBS.labels(queue, state).set(n)
        _OTEL_QUEUE_JOBS.set(n, {"queue": queue, "state": state})


def error_type(exc: BaseException) -> str:
    if isinstance(exc, ApplicationError) and exc.type:
        return exc.type
    return type(exc).__name__


class ForwardedMetrics(Collector):
    """Re-exposes a Prometheus text endpoint (the Temporal SDK's own, bound to localhost) through
    this process's registry, so one port serves both our series and the SDK's."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def describe(self) -> list[Metric]:
        return []  # names are the SDK's to choose; registering must not fetch them

    def collect(self) -> Iterator[Metric]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:  # noqa: S310
                text = response.read().decode()
        except OSError:
            return
        yield from text_string_to_metric_families(text)


# ---------------------------------------------------------------------------------- tracing

_otlp_endpoints: set[str] = set()


def configure_tracing(settings: Settings, service: str) -> TracerProvider:
    """The process's tracer provider (made once); adds the OTLP exporter when configured."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        resource = Resource.create({"service.name": settings.otel_service_name or service})
        provider = TracerProvider(resource=resource)
        trace.set_tracer_provider(provider)
    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/")
    if endpoint and endpoint not in _otlp_endpoints:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{endpoint}/v1/traces")))
        _otlp_endpoints.add(endpoint)
    return provider


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def add_span_event(name: str, attributes: dict[str, Any]) -> None:
    """An event on the current span (a training step with its loss, a checkpoint)."""
    clean = {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)}
    trace.get_current_span().add_event(name, clean)


# ---------------------------------------------------------------------------------- logs

# What the current activity works on; set by the activity interceptor, read by the log format.
job_context: ContextVar[dict[str, str] | None] = ContextVar("tenanttune_job", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with job_id, company_id, workflow_id and trace_id when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = dict(job_context.get() or {})
        # Temporal's workflow/activity loggers put their info on the record.
        for key in ("temporal_workflow", "temporal_activity"):
            extra = getattr(record, key, None)
            if isinstance(extra, dict) and extra.get("workflow_id"):
                context.setdefault("workflow_id", str(extra["workflow_id"]))
        for key in ("job_id", "company_id", "workflow_id"):
            value = getattr(record, key, None) or context.get(key)
            if key == "job_id" and not value:
                value = context.get("workflow_id")  # a job's workflow id is its job id
            if value:
                entry[key] = value
        trace_id = current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ---------------------------------------------------------------------------------- worker


# Activities every job runs several times; their timings are metrics, not log lines.
_HOUSEKEEPING = frozenset({"record_status", "queue_paused"})


class ActivityTelemetry(Interceptor):
    """Times every activity attempt, counts its errors by type, and gives its log lines the job."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityTelemetryInbound(next)


class _ActivityTelemetryInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        company = getattr(input.args[0], "company_id", "") if input.args else ""
        if not company and queue_of(info.workflow_id or ""):
            # Job ids read `<train|deploy>-<companyId>-<hex>`.
            company = (info.workflow_id or "").split("-", 1)[1].rsplit("-", 1)[0]
        token = job_context.set(
            {
                "job_id": info.workflow_id or "",
                "workflow_id": info.workflow_id or "",
                "company_id": str(company or ""),
            }
        )
        start = time.monotonic()
        outcome = "completed"
        try:
            return await super().execute_activity(input)
        except Exception as exc:
            outcome = "failed"
            kind = error_type(exc)
            ERRORS.labels(_job_queue(info.task_queue), info.activity_type, kind).inc()
            _OTEL_ERRORS.add(
                1,
                {
                    "queue": _job_queue(info.task_queue),
                    "stage": info.activity_type,
                    "error_type": kind,
                },
            )
            raise
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            elapsed = time.monotonic() - start
            STAGE_SECONDS.labels(_job_queue(info.task_queue), info.activity_type, outcome).observe(
                elapsed
            )
            _OTEL_STAGE_SECONDS.record(
                elapsed,
                {
                    "queue": _job_queue(info.task_queue),
                    "stage": info.activity_type,
                    "outcome": outcome,
                },
            )
            log.log(
                logging.DEBUG if info.activity_type in _HOUSEKEEPING else logging.INFO,
                "%s %s in %.2f s (attempt %d)",
                info.activity_type,
                outcome,
                elapsed,
                info.attempt,
            )
            job_context.reset(token)


def _job_queue(task_queue: str) -> str:
    """The job queue a task queue serves: `model-training-slots` counts as `model-training`."""
    for queue, slots in SLOT_QUEUES.items():
        if task_queue == slots:
            return queue
    return task_queue
