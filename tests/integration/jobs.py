"""Helpers the integration tests share: follow a job, deploy a model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tenanttune.settings import Settings
from tests.conftest import token

# Fast settings for a tiny model that still learns: high LR, all projections.
FAST = {
    "epochs": 2,
    "batchSize": 8,
    "learningRate": 0.003,
    "loraRank": 16,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


async def follow(
    api: httpx.AsyncClient, job_id: str, headers: dict[str, str], timeout_s: float = 240
) -> list[dict[str, Any]]:
    """Poll a job until it finishes; return every distinct observation."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await api.get(f"/api/ai/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if not seen or (job["state"], job["progress"]) != (seen[-1]["state"], seen[-1]["progress"]):
            seen.append(job)
        if job["state"] in ("completed", "failed"):
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s; last: {seen[-1:]}")


TENANT = "deployer"


async def deploy(
    api: httpx.AsyncClient, settings: Settings, model_path: str, version: str
) -> dict[str, Any]:
    headers = token(settings, TENANT)
    r = await api.post(
        f"/api/ai/models/{TENANT}/deploy",
        json={"modelPath": model_path, "version": version},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"success", "message", "jobId", "status", "modelName"}
    seen = await follow(api, accepted["jobId"], headers, timeout_s=300)
    return {"accepted": accepted, "final": seen[-1], "seen": seen}
