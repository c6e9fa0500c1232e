"""Two worker processes, one per task queue, as on separate hosts: a training job with
autoDeploy crosses both, and each step runs on the worker that polls its queue."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from tenanttune.settings import Settings
from tenanttune.temporal import SEARCH_ATTRIBUTES
from tests.conftest import REPO, TEMPORAL_BIN, free_port, seed_tenant, token
from tests.integration.jobs import FAST, follow

pytestmark = pytest.mark.e2e

# A Redis database of this test's own (the shared test DB may be in use by another session).
REDIS_URL = os.environ.get("TEST_E2E_QUEUES_REDIS_URL", "redis://127.0.0.1:6379/9")
TENANT = "crossing"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    """A private Temporal dev server, a flushed Redis DB, shared data/models dirs (the volume)."""
    root = tmp_path_factory.mktemp("two-queues")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN), search_attributes=list(SEARCH_ATTRIBUTES)
    )
    redis = aioredis.from_url(REDIS_URL)
    await redis.flushdb()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        temporal_address=env.client.service_client.config.target_host,
        redis_url=REDIS_URL,
        jwt_secret=secrets.token_urlsafe(32),  # no secret is built in
        state_dir=root / "api-state",
        data_dir=root / "shared" / "data",
        models_dir=root / "shared" / "models",
        min_examples=10,
    )
    yield {"settings": settings, "client": env.client, "root": root}
    await redis.aclose()
    await env.shutdown()


class Collector:
    """An OTLP/HTTP receiver (protobuf, as the SDK's exporter sends it): what a collector gets."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []  # (service, span name, trace id)
        self.metrics: set[tuple[str, str]] = set()  # (service, metric name)
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                received.take(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, path: str, body: bytes) -> None:
        if path == "/v1/traces":
            traces = ExportTraceServiceRequest.FromString(body)
            for rs in traces.resource_spans:
                service = _service(rs.resource.attributes)
                for ss in rs.scope_spans:
                    self.spans += [(service, sp.name, sp.trace_id.hex()) for sp in ss.spans]
        elif path == "/v1/metrics":
            exported = ExportMetricsServiceRequest.FromString(body)
            for rm in exported.resource_metrics:
                service = _service(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    self.metrics |= {(service, m.name) for m in sm.metrics}


def _service(attributes: Any) -> str:
    return next((a.value.string_value for a in attributes if a.key == "service.name"), "")


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def workers(stack: dict[str, Any], collector: Collector) -> Iterator[dict[str, dict[str, Any]]]:
    """`python worker.py --queues <one>` twice, each with its own state dir (its own host)."""
    settings: Settings = stack["settings"]
    started: dict[str, dict[str, Any]] = {}
    for queue in ("model-training", "model-deployment"):
        port = free_port()
        log = stack["root"] / f"{queue}.log"
        env = {k: v for k, v in os.environ.items() if k.upper() not in _SETTING_NAMES}
        env.update(
            TEMPORAL_ADDRESS=settings.temporal_address,
            REDIS_URL=settings.redis_url,
            STATE_DIR=str(stack["root"] / f"{queue}-host"),
            DATA_DIR=str(settings.data_dir),
            MODELS_DIR=str(settings.models_dir),
            WORKER_METRICS_PORT=str(port),
            LOG_FORMAT="json",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            OTEL_SERVICE_NAME=f"worker-{queue}",
            OTEL_BSP_SCHEDULE_DELAY="200",  # the SDK's own knobs: export soon
            OTEL_METRIC_EXPORT_INTERVAL="1000",
        )
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "worker.py", "--queues", queue],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started[queue] = {"proc": proc, "port": port, "log": log}
    yield started
    for w in started.values():
        w["proc"].send_signal(signal.SIGTERM)
    for w in started.values():
        try:
            w["proc"].wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(w["proc"].pid, signal.SIGKILL)
            w["proc"].wait(10)


_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


@pytest.fixture(scope="module")
async def api(stack: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    from api.app import create_app

    app = create_app(stack["settings"])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def activity_workers(client: Client, workflow_id: str) -> dict[str, str]:
    """Which worker identity (pid@host) started each activity of a workflow."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    return {
        scheduled[e.activity_task_started_event_attributes.scheduled_event_id]: (
            e.activity_task_started_event_attributes.identity
        )
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    }


@pytest.mark.timeout(600)
async def test_a_job_crosses_a_training_and_a_deployment_worker(
    stack: dict[str, Any],
    workers: dict[str, dict[str, Any]],
    api: httpx.AsyncClient,
    collector: Collector,
) -> None:
    settings: Settings = stack["settings"]
    # Ready once both workers poll their queue (the workers import torch: give them time).
    deadline = time.monotonic() + 120
    while True:
        # The checks' detail (pollers' pid@host) is for admins only.
        admin = token(settings, "ops", admin=True)
        body = (await api.get("/readyz", headers=admin)).json()
        if body["status"] == "ready":
            break
        for w in workers.values():
            assert w["proc"].poll() is None, w["log"].read_text()[-3000:]
        assert time.monotonic() < deadline, body
        await asyncio.sleep(1)
    training_id = body["checks"]["queue:model-training"]["pollers"]
    deploy_id = body["checks"]["queue:model-deployment"]["pollers"]
    assert training_id == [f"{workers['model-training']['proc'].pid}@{socket.gethostname()}"]
    assert deploy_id == [f"{workers['model-deployment']['proc'].pid}@{socket.gethostname()}"]

    seed_tenant(settings, TENANT, lines=100)
    headers = token(settings, TENANT)
    r = await api.post(
        f"/api/ai/models/{TENANT}/train",
        json={**FAST, "epochs": 1, "autoDeploy": True, "deployVersion": "v1"},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    final = (await follow(api, job_id, headers, timeout_s=480))[-1]
    assert final["state"] == "completed", final
    deployment = final["result"]["deployment"]
    assert deployment["state"] == "completed", deployment

    client: Client = stack["client"]
    trained_by = await activity_workers(client, job_id)
    deployed_by = await activity_workers(client, deployment["jobId"])
    assert {
        trained_by[a] for a in ("export_training_data", "train_model", "register_model")
    } == set(training_id)
    assert {
        deployed_by[a] for a in ("convert_to_gguf", "deploy_model", "verify_deployment")
    } == set(deploy_id)
    # The deployment is found by its version, as `temporal workflow list --query` would.
    found = [
        w.id async for w in client.list_workflows(f"CompanyId='{TENANT}' AND ModelVersion='v1'")
    ]
    assert found == [deployment["jobId"]]
    # The artifact crossed through the shared models dir.
    assert (settings.models_dir / TENANT / final["result"]["modelPath"]).is_dir()
    assert list((settings.models_dir / "registry").rglob("model.gguf"))

    # Each worker's metrics port: its own stages, and the Temporal SDK's worker metrics.
    training = scrape(workers["model-training"]["port"])
    deploying = scrape(workers["model-deployment"]["port"])

    def stage_count(found: dict[Any, float], stage: str, queue: str) -> float:
        labels = {"queue": queue, "stage": stage, "outcome": "completed"}
        return found.get(("tenanttune_stage_duration_seconds_count", frozenset(labels.items())), 0)

    assert stage_count(training, "train_model", "model-training") == 1
    assert stage_count(deploying, "convert_to_gguf", "model-deployment") == 1
    assert stage_count(deploying, "train_model", "model-training") == 0
    for found in (training, deploying):
        assert any(name.startswith("temporal_") for name, _ in found), "SDK metrics missing"
    completed = frozenset(
        {"queue": "model-deployment", "company_id": TENANT, "outcome": "completed"}.items()
    )
    assert deploying[("tenanttune_jobs_total", completed)] == 1

    # JSON log lines from inside the job carry its ids and the trace.
    lines = [
        json.loads(line)
        for line in workers["model-training"]["log"].read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [entry for entry in lines if entry.get("job_id") == job_id]
    assert mine, lines[-5:]
    assert all(e["company_id"] == TENANT and e["workflow_id"] == job_id for e in mine)
    assert all(len(e.get("trace_id", "")) == 32 for e in mine)
    # ... and the deployment, on the other host, is part of the same trace.
    deploy_lines = [
        json.loads(line)
        for line in workers["model-deployment"]["log"].read_text().splitlines()
        if line.startswith("{")
    ]
    deploy_mine = [e for e in deploy_lines if e.get("job_id") == deployment["jobId"]]
    assert deploy_mine and all(e["company_id"] == TENANT for e in deploy_mine)
    assert {e["trace_id"] for e in deploy_mine} == {e["trace_id"] for e in mine}

    # With OTEL_EXPORTER_OTLP_ENDPOINT set, both workers ship spans and metrics over OTLP.
    trace_id = mine[0]["trace_id"]
    wanted_spans = {
        ("worker-model-training", "RunActivity:train_model", trace_id),
        ("worker-model-deployment", "RunActivity:convert_to_gguf", trace_id),
    }
    wanted_metrics = {
        ("worker-model-training", "tenanttune.stage.duration"),
        ("worker-model-deployment", "tenanttune.vocab"),
    }
    deadline = time.monotonic() + 30
    while not (wanted_spans <= set(collector.spans) and wanted_metrics <= collector.metrics):
        assert time.monotonic() < deadline, (
            wanted_spans - set(collector.spans),
            wanted_metrics - collector.metrics,
        )
        await asyncio.sleep(0.5)
