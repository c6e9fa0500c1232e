"""TenantTune's Temporal workers: `python worker.py [--queues model-training,model-deployment]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from collections.abc import Sequence
from functools import partial

from prometheus_client import REGISTRY, start_http_server
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Interceptor, Worker

from activities.admission import AdmissionActivities
from activities.deployment import DeploymentActivities
from activities.proc import heartbeat_throttle
from activities.queue import QueueActivities
from activities.status import StatusActivities
from activities.training import TrainingActivities
from tenanttune import telemetry
from tenanttune.mirror import JobMirror
from tenanttune.settings import (
    DEPLOYMENT_QUEUE,
    QUEUES,
    TRAINING_QUEUE,
    TRAINING_SLOTS_QUEUE,
    Settings,
    get_settings,
)
from tenanttune.temporal import connect, is_traced
from workflows.deployment import DeploymentWorkflow
from workflows.queue_control import QueueControlWorkflow
from workflows.training import TrainingWorkflow

log = logging.getLogger("tenanttune.worker")


def build_workers(
    client: Client, settings: Settings, mirror: JobMirror, queues: Sequence[str] = QUEUES
) -> list[Worker]:
    """Temporal workers for the given job queues, each with that queue's workflows and
    activities; a training worker also polls the training-slot queue (see below)."""
    status = StatusActivities(mirror, settings)
    training = TrainingActivities(settings, status)
    deployment = DeploymentActivities(settings, status)
    gate = QueueActivities(client)
    admission = AdmissionActivities(settings, mirror)
    # Spans for workflows and activities (unless the client already carries the tracing
    # interceptor, which workers inherit), and per-stage timings and error counts.
    # Tracing goes first (outermost), so the telemetry runs inside the activity's span.
    interceptors: list[Interceptor] = [] if is_traced(client) else [TracingInterceptor()]
    interceptors.append(telemetry.ActivityTelemetry())
    # A recorded heartbeat reaches the server within a tenth of the smallest heartbeat timeout,
    # not 0.8 of it (the SDK's default), so a busy worker cannot lose a live attempt.
    throttle = heartbeat_throttle(
        (settings.train_heartbeat_timeout_s, settings.deploy_heartbeat_timeout_s)
    )
    worker = partial(
        Worker,
        client,
        interceptors=interceptors,
        max_heartbeat_throttle_interval=throttle,
        default_heartbeat_throttle_interval=throttle,
    )
    workers = []
    if TRAINING_QUEUE in queues:
        workers.append(
            worker(
                task_queue=TRAINING_QUEUE,
                workflows=[TrainingWorkflow, QueueControlWorkflow],
                activities=[
                    status.record_status,
                    gate.queue_paused,
                    admission.admit_child_job,
                    training.export_training_data,
                    training.register_model,
                ],
            )
        )
        # Training slots are worker capacity: this worker asks for a train_model task only
        # while fewer than WORKER_MAX_CONCURRENT_TRAININGS run, so the next job waits in
        # Temporal's task queue (visible, cancellable, no heartbeat to miss), never inside an
        # activity of this worker.
        workers.append(
            worker(
                task_queue=TRAINING_SLOTS_QUEUE,
                activities=[training.train_model],
                max_concurrent_activities=settings.worker_max_concurrent_trainings,
            )
        )
    if DEPLOYMENT_QUEUE in queues:
        workers.append(
            worker(
                task_queue=DEPLOYMENT_QUEUE,
                workflows=[DeploymentWorkflow, QueueControlWorkflow],
                activities=[
                    status.record_status,
                    gate.queue_paused,
                    deployment.convert_to_gguf,
                    deployment.deploy_model,
                    deployment.verify_deployment,
                    deployment.unpublish_model,
                    deployment.withdraw_publication,
                    deployment.finish_publish,
                ],
            )
        )
    return workers


async def main(queues: Sequence[str]) -> None:
    settings = get_settings()
    telemetry.configure_logging(settings)
    telemetry.configure_tracing(settings, "tenanttune-worker")
    telemetry.configure_metrics(settings, "tenanttune-worker")
    client = await connect(settings, runtime=_metrics_runtime(settings))
    mirror = JobMirror.from_url(settings.redis_url, settings.redis_prefix, settings.redis_timeout_s)
    workers = build_workers(client, settings, mirror, queues)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker polling %s on %s (training slots: %d)",
        ", ".join(queues),
        settings.temporal_address,
        settings.worker_max_concurrent_trainings if TRAINING_QUEUE in queues else 0,
    )
    runs = [asyncio.create_task(w.run()) for w in workers]
    await stop.wait()
    log.info("shutting down")
    await asyncio.gather(*(w.shutdown() for w in workers))
    await asyncio.gather(*runs, return_exceptions=True)
    await mirror.close()


def _metrics_runtime(settings: Settings) -> Runtime | None:
    """Serve Prometheus metrics on WORKER_METRICS_PORT: ours, and the Temporal SDK's worker
    metrics (task slots, poll and schedule latencies), which the SDK serves on a private port."""
    if not settings.worker_metrics_port:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        sdk_port = probe.getsockname()[1]
    runtime = Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{sdk_port}"))
    )
    REGISTRY.register(telemetry.ForwardedMetrics(f"http://127.0.0.1:{sdk_port}/metrics"))
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
    except OSError as exc:
        # A second worker on one host: it works, it just is not scraped on that port.
        log.warning("metrics port %d unavailable: %s", settings.worker_metrics_port, exc)
    else:
        log.info(
            "metrics on %s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port
        )
    return runtime


def parse_queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown queue(s) {sorted(unknown)}; known: {QUEUES}")
    return queues


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--queues",
        type=parse_queues,
        default=list(QUEUES),
        help="comma-separated task queues to poll (default: all)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.queues))
