"""TenantTune's Temporal workers: `python worker.py [--queues model-training,model-deployment]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from temporalio.client import Client
from temporalio.worker import Worker

from activities.deployment import DeploymentActivities
from activities.queue import QueueActivities
from activities.status import StatusActivities
from activities.training import TrainingActivities
from tenanttune.mirror import JobMirror
from tenanttune.settings import DEPLOYMENT_QUEUE, QUEUES, TRAINING_QUEUE, Settings, get_settings
from tenanttune.temporal import connect
from workflows.deployment import DeploymentWorkflow
from workflows.queue_control import QueueControlWorkflow
from workflows.training import TrainingWorkflow

log = logging.getLogger("tenanttune.worker")


def build_workers(
    client: Client, settings: Settings, mirror: JobMirror, queues: Sequence[str] = QUEUES
) -> list[Worker]:
    """One Temporal worker per queue, each with that queue's workflows and activities."""
    status = StatusActivities(mirror)
    training = TrainingActivities(settings, status)
    deployment = DeploymentActivities(settings, status)
    gate = QueueActivities(client)
    workers = []
    if TRAINING_QUEUE in queues:
        workers.append(
            Worker(
                client,
                task_queue=TRAINING_QUEUE,
                workflows=[TrainingWorkflow, QueueControlWorkflow],
                activities=[
                    status.record_status,
                    gate.queue_paused,
                    training.export_training_data,
                    training.train_model,
                    training.register_model,
                ],
                max_concurrent_activities=settings.worker_max_concurrent_trainings + 4,
            )
        )
    if DEPLOYMENT_QUEUE in queues:
        workers.append(
            Worker(
                client,
                task_queue=DEPLOYMENT_QUEUE,
                workflows=[DeploymentWorkflow, QueueControlWorkflow],
                activities=[
                    status.record_status,
                    gate.queue_paused,
                    deployment.convert_to_gguf,
                    deployment.deploy_model,
                    deployment.verify_deployment,
                    deployment.unpublish_model,
                    deployment.finish_publish,
                ],
            )
        )
    return workers


async def main(queues: Sequence[str]) -> None:
    settings = get_settings()
    client = await connect(settings)
    mirror = JobMirror.from_url(settings.redis_url, settings.redis_prefix, settings.redis_timeout_s)
    workers = build_workers(client, settings, mirror, queues)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker polling %s on %s", ", ".join(queues), settings.temporal_address)
    runs = [asyncio.create_task(w.run()) for w in workers]
    await stop.wait()
    log.info("shutting down")
    await asyncio.gather(*(w.shutdown() for w in workers))
    await asyncio.gather(*runs, return_exceptions=True)
    await mirror.close()


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main(args.queues))
