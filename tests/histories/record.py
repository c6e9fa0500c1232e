"""Record real workflow histories for the replay tests: `python tests/histories/record.py`.

Starts a private embedded stack, runs one training job with autoDeploy (so both a
TrainingWorkflow with a child and a DeploymentWorkflow run), pauses and resumes the training
queue around a second job (the QueueControlWorkflow and the pause gate), and writes each
history as JSON next to this file. Re-record after an intended, compatible workflow change
(see README, "Changing workflows safely").
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from cli import stack  # noqa: E402
from tenanttune.auth import mint_token  # noqa: E402
from tenanttune.settings import TRAINING_QUEUE, Settings  # noqa: E402
from tenanttune.temporal import connect  # noqa: E402
from tenanttune.vocab import control_workflow_id  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BODY = {"epochs": 1, "batchSize": 8, "learningRate": 0.002}


def wait(http: httpx.Client, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job: dict[str, object] = http.get(f"/api/ai/jobs/{job_id}").raise_for_status().json()
        if job["state"] in ("completed", "failed"):
            return job
        time.sleep(0.5)
    raise SystemExit(f"{job_id} did not finish")


async def save(settings: Settings, workflow_id: str, name: str) -> None:
    client = await connect(settings)
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    (HERE / f"{name}.json").write_text(history.to_json())
    print(f"wrote {name}.json ({len(history.events)} events)")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tt-histories-"))
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        jwt_secret=secrets.token_urlsafe(32),  # none is built in; the stack gets this one
        state_dir=root / "state",
        data_dir=root / "data",
        models_dir=root / "models",
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_ui_port=free_port(),
        api_port=free_port(),
        redis_url="redis://127.0.0.1:6379/12",
    )
    tenant = settings.tenant_data_dir("acme")
    tenant.mkdir(parents=True)
    shutil.copy(REPO / "examples/tenants/acme/support.jsonl", tenant)
    admin = {"Authorization": f"Bearer {mint_token(settings, 'ops', admin=True)}"}
    try:
        stack.start_detached(settings)
        headers = {"Authorization": f"Bearer {mint_token(settings, 'acme')}"}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.api_port}", headers=headers, timeout=60
        ) as http:
            body = {**BODY, "autoDeploy": True, "deployVersion": "replay"}
            job = http.post("/api/ai/models/acme/train", json=body).raise_for_status().json()
            trained = wait(http, job["jobId"])
            deployment: dict[str, str] = trained["result"]["deployment"]  # type: ignore[index]
            deploy_id = deployment["jobId"]
            http.post(f"/api/ai/queues/{TRAINING_QUEUE}/pause", headers=admin).raise_for_status()
            held = http.post("/api/ai/models/acme/train", json=BODY).raise_for_status().json()
            time.sleep(3)
            http.post(f"/api/ai/queues/{TRAINING_QUEUE}/resume", headers=admin).raise_for_status()
            wait(http, held["jobId"])
        asyncio.run(save(settings, job["jobId"], "training-autodeploy"))
        asyncio.run(save(settings, deploy_id, "deployment"))
        asyncio.run(save(settings, held["jobId"], "training-paused"))
        asyncio.run(save(settings, control_workflow_id(TRAINING_QUEUE), "queue-control"))
    finally:
        stack.stop(settings)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
