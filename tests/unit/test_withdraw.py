"""A deployment stopped while publishing withdraws only its own publication (local registry)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.deployment import DeploymentActivities
from activities.status import StatusActivities
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings
from tenanttune.types import ConvertResult, PublishRequest


def publish_request(tmp_path: Path, job_id: str, content: bytes) -> PublishRequest:
    gguf = tmp_path / f"{job_id}.gguf"
    gguf.write_bytes(content)
    converted = ConvertResult(str(gguf), job_id, len(content), "llama", 1, 1, True)
    return PublishRequest(job_id, "acme", "tiny-mistral-company-acme:1.0", "local", converted, "")


async def test_withdraw_removes_this_jobs_publication_and_restores_the_previous(
    tmp_path: Path,
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        models_dir=tmp_path / "models",
        state_dir=tmp_path / "state",
        jwt_secret=secrets.token_urlsafe(32),
    )
    acts = DeploymentActivities(
        settings, StatusActivities(JobMirror.from_url("redis://127.0.0.1:1/0"), settings)
    )
    env = ActivityEnvironment()
    old = publish_request(tmp_path, "deploy-acme-old", b"old weights")
    new = publish_request(tmp_path, "deploy-acme-new", b"new weights")
    await env.run(acts.deploy_model, old)
    await env.run(acts.finish_publish, await env.run(acts.deploy_model, old))
    target = acts.registry_path(old.model_name)

    # Another job's model under the name (the verified previous version) is never touched.
    assert await env.run(acts.withdraw_publication, new) is False
    assert (target / "model.gguf").read_bytes() == b"old weights"

    # This job's publication landed (the cancel came too late to stop it): it goes, and the
    # previous version is back under the name.
    await env.run(acts.deploy_model, new)
    assert json.loads((target / "metadata.json").read_text())["deploy_job"] == new.job_id
    assert await env.run(acts.withdraw_publication, new) is True
    assert (target / "model.gguf").read_bytes() == b"old weights"
    assert json.loads((target / "metadata.json").read_text())["deploy_job"] == old.job_id
