"""Faults Bull could not survive, broken for real: processes killed with SIGKILL, duplicate
storms. Timing bounds are generous (shared 2-core machines); every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import training_processes
from tests.e2e.faults.conftest import Cluster, seed_tenant

# A training, a kill, a heartbeat timeout, a restarted worker and the rest of the training
# take minutes on a busy 2-core machine; each wait inside has its own deadline.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
BODY = {  # ~55 steps on 120 examples: long enough to kill half-way, short enough to repeat
    "epochs": 4,
    "batchSize": 8,
    "learningRate": 0.003,
    "loraRank": 8,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def submit(cluster: Cluster, company: str, body: dict[str, object]) -> str:
    r = httpx.post(
        f"{cluster.api_url}/api/ai/models/{company}/train",
        json=body,
        headers=cluster.headers(company),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["jobId"])


def test_worker_killed_mid_training_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "acme", lines=120)
    cluster.start("api")
    cluster.start("worker")
    job_id = submit(cluster, "acme", BODY)
    deadline = time.monotonic() + 700
    while True:  # about half-way, with a checkpoint named in the heartbeat Temporal holds
        running = cluster.running(job_id, "train_model")
        if running and running.started:
            step, total = running.details.get("step", 0), running.details.get("total", 0)
            if running.details.get("checkpoint") and total and step >= 0.45 * total:
                break
        assert time.monotonic() < deadline, (running, cluster.job("acme", job_id))
        time.sleep(0.3)
    # What is killed is the first attempt, running on this worker: none was lost before.
    assert running.attempt == 1, f"attempt {running.attempt} runs: one ended on a live worker"
    assert running.worker == cluster.identity("worker")
    assert len(training_processes()) == 1

    cluster.kill("worker")  # kill -9: no cleanup code runs in the worker
    deadline = time.monotonic() + 10
    while training_processes():
        assert time.monotonic() < deadline, "the training subprocess outlived its worker"
        time.sleep(0.2)

    cluster.start("worker")
    most_at_once = 0
    deadline = time.monotonic() + 700
    while True:
        most_at_once = max(most_at_once, len(training_processes()))
        job = cluster.job("acme", job_id)
        if job["state"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1, "one run of the job: the activity retried, not the job"
    # The second attempt finished it, on the new worker, after the killed one's heartbeat timeout.
    (last,) = cluster.attempts(job_id, "train_model")
    assert (last.attempt, last.outcome) == (2, "completed"), last
    assert last.worker == cluster.identity("worker") and last.after == "heartbeat timeout", last
    assert most_at_once <= 1, "two training processes ran for one job"
    metrics = job["result"]["metrics"]  # type: ignore[index]
    assert metrics["resumedFromStep"] > 0, "the retry started from zero"
    version_dir = cluster.settings.models_dir / job["companyId"] / job["result"]["modelPath"]  # type: ignore[index, operator]
    history = json.loads((version_dir / "metrics.json").read_text())
    steps = [s for s, _ in history["loss_history"]]
    assert steps == list(range(1, metrics["totalSteps"] + 1)), "one loss per step, no restart"


def test_a_training_beyond_the_workers_slots_waits_in_the_queue_not_in_the_worker(
    cluster: Cluster,
) -> None:
    """One training slot, two jobs: the second waits in Temporal's task queue for longer than
    the heartbeat timeout, with no attempt spent, then trains once the first is done."""
    seed_tenant(cluster.settings, "slots", lines=120)
    cluster.start("api")
    cluster.start("worker")  # WORKER_MAX_CONCURRENT_TRAININGS=1, the default
    first = submit(cluster, "slots", BODY)  # ~55 steps: longer than the heartbeat timeout
    deadline = time.monotonic() + 300
    while not ((running := cluster.running(first, "train_model")) and running.started):
        assert time.monotonic() < deadline, cluster.job("slots", first)
        time.sleep(0.3)
    second = submit(cluster, "slots", {**BODY, "epochs": 1})  # the slot is taken
    timeout_s = cluster.settings.train_heartbeat_timeout_s
    waited_from = waited_to = 0.0
    most_at_once = 0
    deadline = time.monotonic() + 700
    while cluster.job("slots", first)["state"] not in ("completed", "failed"):
        most_at_once = max(most_at_once, len(training_processes()))
        running, waiting = (
            cluster.running(first, "train_model"),
            cluster.running(second, "train_model"),
        )
        if running and running.started and waiting:
            assert not waiting.started, "two trainings at once on a one-slot worker"
            assert waiting.attempt == 1, "the waiting job spent an attempt"
            waited_from = waited_from or time.monotonic()
            waited_to = time.monotonic()
        assert time.monotonic() < deadline, cluster.job("slots", first)
        time.sleep(0.5)
    assert waited_to - waited_from > timeout_s + 2, (
        f"the second job waited {waited_to - waited_from:.0f} s for the slot; the test needs "
        f"longer than the heartbeat timeout ({timeout_s} s) to prove anything"
    )
    assert cluster.wait_for("slots", second)["state"] == "completed"
    assert cluster.job("slots", first)["state"] == "completed"
    for job_id in (first, second):
        (only,) = cluster.attempts(job_id, "train_model")
        assert (only.attempt, only.outcome, only.after) == (1, "completed", ""), (job_id, only)
    assert most_at_once <= 1, "two training processes at once on a one-slot worker"


def test_duplicate_submission_storm_runs_one_job(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "storm", lines=40)
    cluster.start("api")
    cluster.start("worker")
    headers = {**cluster.headers("storm"), "Idempotency-Key": "order-7-retrain"}
    body = {**BODY, "epochs": 1}

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.api_url, timeout=300) as client:
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
    (only,) = cluster.attempts(job_id, "train_model")
    assert (only.attempt, only.outcome) == (1, "completed"), only


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
    deadline = time.monotonic() + 300
    while cluster.job("steady", job_id)["state"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    cluster.kill("api")
    time.sleep(2)
    cluster.start("api")
    assert cluster.job("steady", job_id)["state"] in ("active", "completed")
    assert cluster.wait_for("steady", job_id)["state"] == "completed"
    (only,) = cluster.attempts(job_id, "train_model")
    assert (only.attempt, only.outcome) == (1, "completed"), "the API's restart cost an attempt"
