"""The `ollama` deployment target, against the Ollama API stand-in (no Ollama server here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from temporalio.testing import ActivityEnvironment

from activities.deployment import DeploymentActivities
from activities.status import StatusActivities
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings
from tenanttune.types import ConvertResult, PublishRequest
from tests.conftest import free_port, model_dir, token
from tests.integration.jobs import TENANT, deploy
from tests.ollama_standin import run_standin

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_standin(tmp_path_factory.mktemp("ollama")) as url:
        yield url


@pytest.fixture
def ollama_target(settings: Settings, standin: str) -> Iterator[str]:
    """Point the (shared) settings at the stand-in for one test."""
    before = (settings.deploy_target, settings.ollama_host)
    settings.deploy_target, settings.ollama_host = "ollama", standin
    yield standin
    settings.deploy_target, settings.ollama_host = before


async def test_deploy_to_ollama_end_to_end(
    api: httpx.AsyncClient,
    settings: Settings,
    trained: dict[str, Any],
    ollama_target: str,
) -> None:
    out = await deploy(api, settings, f"{TENANT}/{trained['modelPath']}", "7.0")
    final = out["final"]
    assert final["state"] == "completed", final
    name = f"tiny-mistral-company-{TENANT}:7.0"
    result = final["result"]
    assert result["target"] == "ollama" and result["location"] == ollama_target
    assert result["verification"]["text"].strip()

    client = ollama.Client(host=ollama_target)
    assert name in [m.model for m in client.list().models]
    shown = client.show(name)
    assert result["digest"].replace(":", "-") in (shown.modelfile or "")
    assert "[INST]" in (shown.template or "")
    answer = client.generate(
        model=name, prompt="How do I export invoices?", options={"num_predict": 8, "temperature": 0}
    )
    assert answer.response.strip()


async def test_publish_retry_does_not_upload_or_create_twice(
    settings: Settings,
    trained: dict[str, Any],
    ollama_target: str,
    tmp_path: Path,
) -> None:
    """A retry after a crash (same request again) finds the blob and the model and stops."""
    gguf = model_dir(settings, TENANT, trained) / "model-f16.gguf"
    if not gguf.exists():
        from training.convert import convert_model

        convert_model(model_dir(settings, TENANT, trained), gguf)
    import hashlib

    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    request = PublishRequest(
        job_id="deploy-x-0000000000000001",
        company_id=TENANT,
        model_name="retry-me:1",
        target="ollama",
        source_model_path=str(model_dir(settings, TENANT, trained)),
        gguf=ConvertResult(
            gguf_path=str(gguf),
            sha256=digest,
            size=gguf.stat().st_size,
            architecture="llama",
            tensor_count=21,
            vocab_size=512,
            converted=True,
        ),
    )
    mirror = JobMirror.from_url(settings.redis_url)
    acts = DeploymentActivities(settings, StatusActivities(mirror, settings))
    env = ActivityEnvironment()
    first = await env.run(acts.deploy_model, request)
    stats_before = httpx.get(f"{ollama_target}/_standin/stats").json()
    second = await env.run(acts.deploy_model, request)
    stats_after = httpx.get(f"{ollama_target}/_standin/stats").json()
    await mirror.close()
    assert first.created and second.created  # still this job's publication, for rollback
    assert second.digest == first.digest == f"sha256:{digest}"
    assert stats_after["blob_posts"] == stats_before["blob_posts"], "no second upload"
    assert stats_after["creates"] == stats_before["creates"], "no second create"


async def test_unreachable_ollama_retries_then_fails_clearly(
    api: httpx.AsyncClient,
    settings: Settings,
    trained: dict[str, Any],
) -> None:
    before = (
        settings.deploy_target,
        settings.ollama_host,
        settings.deploy_max_attempts,
        settings.deploy_retry_initial_s,
    )
    host = f"http://127.0.0.1:{free_port()}"
    settings.deploy_target, settings.ollama_host = "ollama", host
    settings.deploy_max_attempts, settings.deploy_retry_initial_s = 2, 0.2
    try:
        out = await deploy(api, settings, f"{TENANT}/{trained['modelPath']}", "8.0")
    finally:
        (
            settings.deploy_target,
            settings.ollama_host,
            settings.deploy_max_attempts,
            settings.deploy_retry_initial_s,
        ) = before
    final = out["final"]
    assert final["state"] == "failed"
    assert f"deploying failed: Ollama at {host} is unreachable" in final["failedReason"]
    r = await api.get(f"/api/ai/jobs/{out['accepted']['jobId']}", headers=token(settings, TENANT))
    assert r.json()["state"] == "failed"
