"""Faults Bull could not survive, broken for real: processes killed with SIGKILL, duplicate
storms. Timing bounds are generous (shared 2-core machines); every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import training_processes
from tests.e2e.faults.conftest import Cluster, seed_tenant

pytestmark = pytest.mark.e2e
BODY = {
    "epochs": 6,
    "batchSize": 8,
    "learningRate": 0.003,
    "loraRank": 16,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def test_worker_killed_mid_training_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "acme", lines=200)
    cluster.start("api")
    cluster.start("worker")
    r = httpx.post(
        f"{cluster.api_url}/api/ai/models/acme/train",
        json=BODY,
        headers=cluster.headers("acme"),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    checkpoints = cluster.settings.runs_dir / job_id / "checkpoints"
    deadline = time.monotonic() + 180
    while True:  # about half-way, with at least one checkpoint named in a heartbeat
        job = cluster.job("acme", job_id)
        if float(job["progress"]) >= 45 and list(checkpoints.glob("checkpoint-*")):  # type: ignore[arg-type]
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert len(training_processes()) == 1

    cluster.kill("worker")  # kill -9: no cleanup code runs in the worker
    deadline = time.monotonic() + 10
    while training_processes():
        assert time.monotonic() < deadline, "the training subprocess outlived its worker"
        time.sleep(0.2)

    cluster.start("worker")
    most_at_once = 0
    deadline = time.monotonic() + 300
    while True:
        most_at_once = max(most_at_once, len(training_processes()))
        job = cluster.job("acme", job_id)
        if job["state"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job["state"] == "completed", job
    assert most_at_once <= 1, "two training processes ran for one job"
    metrics = job["result"]["metrics"]  # type: ignore[index]
    assert metrics["resumed_from_step"] > 0, "the retry started from zero"
    history = json.loads((Path(job["result"]["model_path"]) / "metrics.json").read_text())  # type: ignore[index]
    steps = [s for s, _ in history["loss_history"]]
    assert steps == list(range(1, metrics["total_steps"] + 1)), "one loss per step, no restart"


def test_duplicate_submission_storm_runs_one_job(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "storm", lines=40)
    cluster.start("api")
    cluster.start("worker")
    headers = {**cluster.headers("storm"), "Idempotency-Key": "order-7-retrain"}
    body = {**BODY, "epochs": 1}

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.api_url, timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post("/api/ai/models/storm/train", json=body, headers=headers)
                    for _ in range(50)
                ]
            )

    answers = asyncio.run(storm())
    assert {r.status_code for r in answers} == {202}
    ids = {r.json()["jobId"] for r in answers}
    assert len(ids) == 1
    (job_id,) = ids
    final = cluster.wait_for("storm", job_id)
    assert final["state"] == "completed"
    runs = list((cluster.settings.models_dir / "storm").iterdir())
    assert [p.name for p in runs] == [job_id], "exactly one training run produced a model"


def test_api_restart_mid_job_changes_nothing(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "steady", lines=120)
    cluster.start("api")
    cluster.start("worker")
    r = httpx.post(
        f"{cluster.api_url}/api/ai/models/steady/train",
        json={**BODY, "epochs": 3},
        headers=cluster.headers("steady"),
        timeout=30,
    )
    job_id = r.json()["jobId"]
    deadline = time.monotonic() + 120
    while cluster.job("steady", job_id)["state"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    cluster.kill("api")
    time.sleep(2)
    cluster.start("api")
    assert cluster.job("steady", job_id)["state"] in ("active", "completed")
    assert cluster.wait_for("steady", job_id)["state"] == "completed"
