"""Training jobs for real: Temporal dev server, Redis, the training subprocess, a tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus

from tenanttune.settings import Settings
from tenanttune.temporal import COMPANY_ID, JOB_KIND, job_search_attributes
from tenanttune.types import TrainRequest
from tests.conftest import seed_tenant, token, training_processes
from tests.integration.jobs import FAST, follow
from workflows.training import TrainingWorkflow

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]


async def test_training_job_end_to_end(
    api: httpx.AsyncClient,
    settings: Settings,
    temporal_env: Any,
    redis_client: aioredis.Redis,
    no_leftover_training: None,
) -> None:
    seed_tenant(settings, "acme", lines=160)
    headers = token(settings, "acme")
    r = await api.post("/api/ai/models/acme/train", json=FAST, headers=headers)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert set(queued) == {"success", "message", "jobId", "status", "datasetSize", "qualityScore"}
    assert queued["success"] is True and queued["status"] == "queued"
    assert queued["datasetSize"] == 160 and 0.9 < queued["qualityScore"] <= 1.0
    job_id = queued["jobId"]

    seen = await follow(api, job_id, headers)
    states = [s["state"] for s in seen]
    assert states[0] in ("waiting", "active") and states[-1] == "completed", states
    assert "active" in states
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress), "progress only rises"
    assert any(0 < p < 100 for p in progress), f"progress was reported while training: {progress}"
    assert progress[-1] == 100

    final = seen[-1]
    result = final["result"]
    metrics = result["metrics"]
    assert metrics["evalLoss"] < metrics["firstEvalLoss"], metrics
    assert metrics["tokensPerS"] > 0 and metrics["steps"] == metrics["totalSteps"] > 0
    assert result["modelPath"] == job_id, "the version dir, relative to the tenant's models dir"
    model_dir = settings.models_dir / "acme" / job_id
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["job_id"] == job_id and manifest["company_id"] == "acme"
    assert manifest["hyperparameters"]["learning_rate"] == 0.003
    assert len(manifest["dataset"]["sha256"]) == 64
    assert not list(model_dir.glob("*.bin")) and (model_dir / "adapter_model.safetensors").exists()
    assert not (settings.runs_dir / job_id).exists(), "scratch space is cleaned up"
    assert (settings.data_dir / "acme-training.jsonl").exists()

    # The adapter loads back with peft and changes the base model's output.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(settings.tiny_base_dir))
    ids = torch.tensor([[1, 20, 30, 40]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(model_dir))
    assert not torch.allclose(before, tuned(ids).logits)

    # The Bull-shaped mirror holds the finished job, in exactly one collection.
    h = await redis_client.hgetall(f"bull:model-training:{job_id}")
    assert h["companyId"] == "acme" and h["name"] == "train"
    assert json.loads(h["returnvalue"])["modelPath"] == result["modelPath"]
    assert int(h["finishedOn"]) >= int(h["processedOn"]) >= int(h["timestamp"])
    assert await redis_client.zscore("bull:model-training:completed", job_id) is not None
    for coll in ("wait", "active", "paused"):
        assert await redis_client.lpos(f"bull:model-training:{coll}", job_id) is None
    assert await redis_client.zscore("bull:model-training:failed", job_id) is None

    # Temporal knows the job by its tenant and kind (what the Web UI and CLI filter on).
    desc = await temporal_env.client.get_workflow_handle(job_id).describe()
    assert desc.typed_search_attributes.get(COMPANY_ID) == "acme"
    assert desc.typed_search_attributes.get(JOB_KIND) == "training"

    # With the mirror gone, the API answers from Temporal, with the same outcome.
    await redis_client.delete(f"bull:model-training:{job_id}")
    r = await api.get(f"/api/ai/jobs/{job_id}", headers=headers)
    again = r.json()
    assert again["source"] == "temporal" and again["state"] == "completed"
    assert again["result"]["modelPath"] == result["modelPath"]

    # Another tenant cannot see it: 404, exactly like a job that does not exist.
    r = await api.get(f"/api/ai/jobs/{job_id}", headers=token(settings, "globex"))
    assert r.status_code == 404


async def test_same_idempotency_key_returns_the_same_job(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    seed_tenant(settings, "idem", lines=60)
    headers = {**token(settings, "idem"), "Idempotency-Key": "order-42"}
    body = {**FAST, "epochs": 1}
    first = (await api.post("/api/ai/models/idem/train", json=body, headers=headers)).json()
    second = (await api.post("/api/ai/models/idem/train", json=body, headers=headers)).json()
    assert first["jobId"] == second["jobId"]
    client: Client = temporal_env.client
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{first['jobId']}'")]
    assert len(runs) == 1
    await follow(api, first["jobId"], token(settings, "idem"))


async def test_unusable_data_fails_once_without_retrying(
    settings: Settings, temporal_env: Any, api: httpx.AsyncClient
) -> None:
    """Data that turns bad after queueing: the export fails non-retryably with the reason."""
    tenant = settings.tenant_data_dir("poisoned")
    tenant.mkdir(parents=True, exist_ok=True)
    (tenant / "bad.jsonl").write_text('{"messages": "oops"}\n')
    client: Client = temporal_env.client
    job_id = "train-poisoned-00000000000000aa"
    handle = await client.start_workflow(
        TrainingWorkflow.run,
        TrainRequest(job_id=job_id, company_id="poisoned"),
        id=job_id,
        task_queue="model-training",
        search_attributes=job_search_attributes("poisoned", "training"),
    )
    seen = await follow(api, job_id, token(settings, "poisoned"), timeout_s=60)
    final = seen[-1]
    assert final["state"] == "failed"
    assert "exporting failed" in final["failedReason"]
    assert "bad.jsonl line 1" in final["failedReason"]
    assert '"messages" must be a non-empty list' in final["failedReason"]
    history = await handle.fetch_history()
    export_attempts = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.attempt >= 1
    ]
    failed = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert len(failed) == 1, "a non-retryable failure is tried once"
    assert export_attempts
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED


async def test_killed_training_resumes_from_its_checkpoint(
    api: httpx.AsyncClient, settings: Settings, no_leftover_training: None
) -> None:
    """A crash of the training process: the retry resumes from the heartbeat's checkpoint."""
    seed_tenant(settings, "crashy", lines=200)
    headers = token(settings, "crashy")
    body = {**FAST, "epochs": 3}
    job_id = (await api.post("/api/ai/models/crashy/train", json=body, headers=headers)).json()[
        "jobId"
    ]
    checkpoints = settings.runs_dir / job_id / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("checkpoint-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let the heartbeat carrying the checkpoint go out
    pids = training_processes()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)

    seen = await follow(api, job_id, headers, timeout_s=300)
    final = seen[-1]
    assert final["state"] == "completed", final
    metrics = final["result"]["metrics"]
    assert metrics["resumedFromStep"] > 0
    assert metrics["steps"] == metrics["totalSteps"]
    model_dir = settings.models_dir / final["companyId"] / final["result"]["modelPath"]
    history = json.loads((model_dir / "metrics.json").read_text())["loss_history"]
    steps = [s for s, _ in history]
    assert steps == list(range(1, metrics["totalSteps"] + 1)), "one loss per step, no restart"


async def test_cancel_stops_the_training_process(
    api: httpx.AsyncClient, settings: Settings, temporal_env: Any
) -> None:
    seed_tenant(settings, "quitter", lines=200)
    headers = token(settings, "quitter")
    body = {**FAST, "epochs": 20}
    job_id = (await api.post("/api/ai/models/quitter/train", json=body, headers=headers)).json()[
        "jobId"
    ]
    deadline = time.monotonic() + 120
    while True:
        job = (await api.get(f"/api/ai/jobs/{job_id}", headers=headers)).json()
        if job["progress"] > 6:
            break
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)
    assert training_processes()
    await temporal_env.client.get_workflow_handle(job_id).cancel()
    deadline = time.monotonic() + 30
    while training_processes():
        assert time.monotonic() < deadline, "training kept running after cancel"
        await asyncio.sleep(0.2)
    seen = await follow(api, job_id, headers, timeout_s=60)
    assert seen[-1]["state"] == "failed"
    assert "cancelled" in seen[-1]["failedReason"]
