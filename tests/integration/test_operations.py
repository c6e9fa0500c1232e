"""Operations for real: one trace per request, Prometheus series, readiness, the job's metrics,
loss curve and event stream, the `temporal` CLI against the dev server, `tenanttune selftest`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from api.app import create_app
from tenanttune import telemetry
from tenanttune.settings import Settings
from tenanttune.temporal import job_start_metadata
from tenanttune.types import TrainRequest
from tests.conftest import TEMPORAL_BIN, seed_tenant, token
from tests.integration.jobs import FAST, follow
from workflows.training import TrainingWorkflow

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

TENANT = "ops"
CLI = Path(sys.executable).parent / "tenanttune"


@pytest.fixture(scope="module")
def spans(settings: Settings) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(settings, "tests").add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def sample(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    events, current = [], {}
    async for line in response.aiter_lines():
        if not line:
            if current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            current[key] = json.loads(value) if key == "data" else value
    return events


@pytest.fixture(scope="module")
async def ops_job(
    api: httpx.AsyncClient, settings: Settings, spans: InMemorySpanExporter
) -> dict[str, Any]:
    """One training job through the API, followed to the end over its event stream."""
    seed_tenant(settings, TENANT, lines=100)
    headers = token(settings, TENANT)
    before = samples((await api.get("/metrics")).text)
    r = await api.post(
        f"/api/ai/models/{TENANT}/train", json={**FAST, "epochs": 1}, headers=headers
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    async with api.stream(
        "GET", f"/api/ai/jobs/{job_id}/events", headers=headers, timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await asyncio.wait_for(read_sse(response), 300)
    final = (await api.get(f"/api/ai/jobs/{job_id}", headers=headers)).json()
    assert final["state"] == "completed", final
    return {"job_id": job_id, "events": events, "before": before, "final": final}


async def test_one_request_is_one_trace_down_to_the_training_steps(
    ops_job: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    finished = spans.get_finished_spans()
    request = next(
        s
        for s in finished
        if s.name == "POST /api/ai/models/{company_id}/train"
        and s.attributes
        and f"/models/{TENANT}/"
        in str(s.attributes.get("http.target", s.attributes.get("url.path")))
    )
    trace_id = request.context.trace_id
    mine = [s for s in finished if s.context.trace_id == trace_id]
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in mine:
        by_name.setdefault(s.name, []).append(s)

    def only(name: str) -> ReadableSpan:
        assert name in by_name, f"{name} missing from the trace; it has {sorted(by_name)}"
        return by_name[name][0]

    def parent_of(span: ReadableSpan) -> int | None:
        return span.parent.span_id if span.parent else None

    # The SDK's interceptor hangs the workflow's own spans (run, each activity scheduled,
    # complete) under the span that started it; each activity's execution under its scheduling.
    start = only("StartWorkflow:TrainingWorkflow")
    run = only("RunWorkflow:TrainingWorkflow")
    assert parent_of(start) == request.context.span_id
    assert parent_of(run) == start.context.span_id
    assert parent_of(only("CompleteWorkflow:TrainingWorkflow")) == start.context.span_id
    for activity in ("export_training_data", "train_model", "register_model", "record_status"):
        scheduled = only(f"StartActivity:{activity}")
        executed = only(f"RunActivity:{activity}")
        assert parent_of(scheduled) == start.context.span_id, activity
        assert parent_of(executed) == scheduled.context.span_id, activity
    steps = [e for e in only("RunActivity:train_model").events if e.name == "step"]
    total = ops_job["final"]["result"]["metrics"]["steps"]
    assert [e.attributes["step"] for e in steps if e.attributes] == list(range(1, total + 1))
    assert all(e.attributes and e.attributes["loss"] > 0 for e in steps)


async def test_metrics_count_the_job_its_stages_and_queue_lengths(
    ops_job: dict[str, Any], api: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    r = await api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after, before = samples(r.text), ops_job["before"]
    q = "model-training"
    assert (
        sample(after, "tenanttune_jobs_total", queue=q, company_id=TENANT, outcome="completed") == 1
    )
    for name, labels in (
        ("tenanttune_job_duration_seconds_count", {"queue": q, "outcome": "completed"}),
        (
            "tenanttune_stage_duration_seconds_count",
            {"queue": q, "stage": "train_model", "outcome": "completed"},
        ),
        (
            "tenanttune_stage_duration_seconds_count",
            {"queue": q, "stage": "export_training_data", "outcome": "completed"},
        ),
    ):
        assert sample(after, name, **labels) - sample(before, name, **labels) >= 1, name
    seconds = sample(after, "tenanttune_job_duration_seconds_sum", queue=q, outcome="completed")
    assert seconds > 0
    completed = await redis_client.zcard(f"bull:{q}:completed")
    assert sample(after, "tenanttune_queue_jobs", queue=q, state="completed") == completed > 0
    assert sample(after, "tenanttune_mirror_up") == 1


async def test_errors_are_counted_by_type_and_failures_by_tenant(
    settings: Settings, temporal_env: Any, api: httpx.AsyncClient
) -> None:
    """A job whose data is gone when it runs: one InvalidDatasetError in the export stage."""
    before = samples((await api.get("/metrics")).text)
    job_id = "train-ops-nodata-00000000000000bb"
    req = TrainRequest(job_id=job_id, company_id="ops-nodata")
    await temporal_env.client.start_workflow(
        TrainingWorkflow.run, req, id=job_id, task_queue="model-training", **job_start_metadata(req)
    )
    final = (await follow(api, job_id, token(settings, "ops-nodata"), timeout_s=60))[-1]
    assert final["state"] == "failed"
    after = samples((await api.get("/metrics")).text)
    labels = {"queue": "model-training", "stage": "export_training_data"}
    name = "tenanttune_errors_total"
    assert (
        sample(after, name, **labels, error_type="InvalidDatasetError")
        - sample(before, name, **labels, error_type="InvalidDatasetError")
        == 1
    )
    failed = {"queue": "model-training", "company_id": "ops-nodata", "outcome": "failed"}
    assert sample(after, "tenanttune_jobs_total", **failed) == 1


async def test_job_metrics_and_loss_curve(
    ops_job: dict[str, Any], api: httpx.AsyncClient, settings: Settings
) -> None:
    job_id, headers = ops_job["job_id"], token(settings, TENANT)
    r = await api.get(f"/api/ai/jobs/{job_id}/metrics", headers=headers)
    assert r.status_code == 200, r.text
    data = r.json()
    summary = ops_job["final"]["result"]["metrics"]
    assert data["source"] == "model"
    assert [p["step"] for p in data["loss"]] == list(range(1, summary["steps"] + 1))
    assert data["trainLoss"] == pytest.approx(summary["trainLoss"])
    assert data["firstEvalLoss"] == pytest.approx(summary["firstEvalLoss"])
    assert data["lastEvalLoss"] == pytest.approx(summary["evalLoss"])
    assert data["tokensPerS"] > 0

    r = await api.get(f"/api/ai/jobs/{job_id}/loss.png", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    image.load()
    assert image.format == "PNG" and image.size == (800, 480)
    assert len(image.convert("L").getcolors(maxcolors=1 << 16) or []) > 10, "a blank canvas"

    stranger = token(settings, "someone-else")
    for path in ("metrics", "loss.png", "events"):
        r = await api.get(f"/api/ai/jobs/{job_id}/{path}", headers=stranger)
        assert r.status_code == 404, path


async def test_event_stream_delivers_the_job_in_order(
    ops_job: dict[str, Any], api: httpx.AsyncClient, settings: Settings
) -> None:
    events = ops_job["events"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "state" and events[0]["data"]["state"] == "active"
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    assert events[-1]["data"]["result"]["modelPath"] == ops_job["final"]["result"]["modelPath"]
    steps = [e["data"]["step"] for e in events if e["event"] == "step"]
    total = ops_job["final"]["result"]["metrics"]["steps"]
    assert steps == list(range(1, total + 1)), "every step, once, in order"
    assert all(e["data"]["loss"] > 0 for e in events if e["event"] == "step")
    checkpoints = [i for i, k in enumerate(kinds) if k == "checkpoint"]
    assert checkpoints, "checkpoints are announced"
    for i in checkpoints:
        step = events[i]["data"]["step"]
        assert step in steps[: kinds[:i].count("step")], "a checkpoint follows its step"
    assert "eval" in kinds
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # A client that reconnects with Last-Event-ID gets only what it missed.
    headers = {**token(settings, TENANT), "Last-Event-ID": events[2]["id"]}
    async with api.stream("GET", f"/api/ai/jobs/{ops_job['job_id']}/events", headers=headers) as r:
        again = await read_sse(r)
    assert [e["id"] for e in again] == [e["id"] for e in events[3:]]


async def test_event_stream_without_redis_ends_with_the_outcome_from_temporal(
    ops_job: dict[str, Any], settings: Settings
) -> None:
    app = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            async with client.stream(
                "GET", f"/api/ai/jobs/{ops_job['job_id']}/events", headers=token(settings, TENANT)
            ) as r:
                assert r.status_code == 200
                events = await asyncio.wait_for(read_sse(r), 60)
    assert [e["event"] for e in events] == ["completed"]
    assert events[0]["data"]["result"]["modelPath"] == ops_job["final"]["result"]["modelPath"]


async def test_readyz_names_what_is_missing(api: httpx.AsyncClient, settings: Settings) -> None:
    admin = token(settings, "ops", admin=True)  # the checks' detail is for admins only
    r = await api.get("/readyz", headers=admin)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready", body
    for queue in ("model-training", "model-deployment"):
        assert body["checks"][f"queue:{queue}"]["pollers"], "the in-process worker polls it"
    assert (await api.get("/healthz")).json() == {"status": "ok"}

    async def ready(**override: Any) -> httpx.Response:
        app = create_app(settings.model_copy(update=override))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                return await client.get("/readyz", headers=admin)

    r = await ready(redis_url="redis://127.0.0.1:1/0")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded"
    assert not body["checks"]["redis"]["ok"] and "REDIS_URL" in body["checks"]["redis"]["hint"]
    assert body["checks"]["temporal"]["ok"]

    r = await ready(temporal_address="127.0.0.1:1")
    body = r.json()
    assert r.status_code == 503 and body["status"] == "unavailable"
    assert "TEMPORAL_ADDRESS" in body["checks"]["temporal"]["hint"]


async def run(*cmd: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    return proc.returncode or 0, out.decode()


async def test_temporal_cli_lists_describes_shows_replays_cancels_and_resets(
    ops_job: dict[str, Any],
    temporal_env: Any,
    api: httpx.AsyncClient,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """The commands the README's Operations section shows, run as written there."""
    job_id = ops_job["job_id"]
    address = ["--address", settings.temporal_address]
    wf = TEMPORAL_BIN

    rc, out = await run(
        wf, "workflow", "list", *address, "--output", "json",
        "--query", f"CompanyId='{TENANT}' AND JobKind='training'",
    )  # fmt: skip
    assert rc == 0, out
    listed = json.loads(out)
    assert [w["execution"]["workflowId"] for w in listed] == [job_id]

    rc, out = await run(wf, "workflow", "describe", *address, "--workflow-id", job_id)
    assert rc == 0, out
    assert "COMPLETED" in out.upper() and f"train {TENANT}: 1 epochs" in out

    history = tmp_path / "history.json"
    rc, out = await run(wf, "workflow", "show", *address, "--workflow-id", job_id, "-o", "json")
    assert rc == 0
    history.write_text(out)
    assert "WORKFLOW_EXECUTION_COMPLETED" in out.upper().replace("EVENT_TYPE_", "")
    rc, out = await run(CLI, "replay", history)
    assert rc == 0 and "✓" in out, out

    # Reset: run the job again from its first workflow task (a new run, same job id).
    client: Client = temporal_env.client
    first_run = (await client.get_workflow_handle(job_id).describe()).run_id
    rc, out = await run(
        wf, "workflow", "reset", *address, "--workflow-id", job_id,
        "--type", "FirstWorkflowTask", "--reason", "operations test",
    )  # fmt: skip
    assert rc == 0, out
    handle = client.get_workflow_handle(job_id)
    result = await asyncio.wait_for(handle.result(), 240)
    assert (await handle.describe()).run_id != first_run
    assert Path(result["model_path"]).name == ops_job["final"]["result"]["modelPath"]

    # Cancel a job that has not started yet.
    headers = token(settings, TENANT)
    r = await api.post(
        f"/api/ai/models/{TENANT}/train", json={**FAST, "delay": 600_000}, headers=headers
    )
    delayed = r.json()["jobId"]
    rc, out = await run(wf, "workflow", "cancel", *address, "--workflow-id", delayed)
    assert rc == 0, out
    final = (await follow(api, delayed, headers, timeout_s=60))[-1]
    assert final["state"] == "failed" and "cancelled" in final["failedReason"]


def _stack_env(settings: Settings, **override: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "REDIS_"))}
    env.update(
        TEMPORAL_ADDRESS=settings.temporal_address,
        REDIS_URL=settings.redis_url,
        STATE_DIR=str(settings.state_dir),
        DATA_DIR=str(settings.data_dir),
        MODELS_DIR=str(settings.models_dir),
        MIN_EXAMPLES=str(settings.min_examples),
        BASE_MODEL="",
    )
    env.update(override)
    return env


@pytest.mark.timeout(400)
async def test_selftest_passes_against_a_working_stack(settings: Settings, tmp_path: Path) -> None:
    rc, out = await run(CLI, "selftest", "--timeout", "300", env=_stack_env(settings))
    assert rc == 0, out
    for name in ("temporal", "redis", "workers on model-training", "workers on model-deployment",
                 "models dir", "search attributes", "training job"):  # fmt: skip
        assert any(line.startswith(f"✓ {name}") for line in out.splitlines()), (name, out)
    assert "1 step" in out and "✗" not in out


async def test_selftest_says_what_is_broken_and_how_to_fix_it(settings: Settings) -> None:
    env = _stack_env(settings, TEMPORAL_ADDRESS="127.0.0.1:1", REDIS_URL="redis://127.0.0.1:1/0")
    rc, out = await run(CLI, "selftest", env=env)
    assert rc == 1, out
    lines = out.splitlines()
    assert any(line.startswith("✗ temporal") for line in lines), out
    assert any(line.startswith("✗ redis") for line in lines), out
    assert any(line.startswith("✗ training job") for line in lines), out
    assert sum("hint:" in line for line in lines) >= 3
