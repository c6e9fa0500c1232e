"""Deploy requests that must be refused before anything runs: 400, nothing queued."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from jobs.model_paths import ModelPathError, resolve_model_path
from tenanttune.settings import Settings
from tests.conftest import token

TENANT = "pathcheck"


def make_adapter(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"x")
    return d


@pytest.fixture
def tenant_models(settings: Settings) -> Path:
    root = settings.models_dir / TENANT
    make_adapter(root / "v1")
    make_adapter(settings.models_dir / "victim" / "secret")
    link = root / "escape"
    if not link.exists():
        os.symlink(settings.models_dir / "victim" / "secret", link)
    return root


@pytest.mark.parametrize(
    ("model_path", "message"),
    [
        ("../victim/secret", "must not contain '..'"),
        (f"./models/{TENANT}/../victim/secret", "must not contain '..'"),
        ("/etc", "must be inside your models directory"),
        ("file:///etc/passwd", "not a URL"),
        ("http://169.254.169.254/latest", "not a URL"),
        ("escape", "must be inside your models directory"),  # symlink inside, pointing out
        ("nothing-here", "no model at"),
        ("", "modelPath is empty"),
    ],
)
async def test_bad_model_paths_are_400(
    api: httpx.AsyncClient, settings: Settings, tenant_models: Path, model_path: str, message: str
) -> None:
    r = await api.post(
        f"/api/ai/models/{TENANT}/deploy",
        headers=token(settings, TENANT),
        json={"modelPath": model_path, "version": "1.0"},
    )
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("version", ["1.0:x", "-1", ".hidden", "a/b", "x" * 129, ""])
async def test_bad_version_tags_are_400(
    api: httpx.AsyncClient, settings: Settings, tenant_models: Path, version: str
) -> None:
    r = await api.post(
        f"/api/ai/models/{TENANT}/deploy",
        headers=token(settings, TENANT),
        json={"modelPath": "v1", "version": version},
    )
    assert r.status_code in (400, 422), r.text
    assert "version" in r.text


async def test_other_tenants_cannot_deploy_here(
    api: httpx.AsyncClient, settings: Settings, tenant_models: Path
) -> None:
    r = await api.post(
        f"/api/ai/models/{TENANT}/deploy",
        headers=token(settings, "victim"),
        json={"modelPath": "v1", "version": "1.0"},
    )
    assert r.status_code == 403


def test_accepted_path_forms(settings: Settings, tenant_models: Path) -> None:
    v1 = (tenant_models / "v1").resolve()
    for raw in (f"./models/{TENANT}/v1", f"models/{TENANT}/v1", f"{TENANT}/v1", "v1", str(v1)):
        assert resolve_model_path(raw, settings.models_dir, TENANT) == v1, raw
    with pytest.raises(ModelPathError, match="no trained model yet"):
        resolve_model_path(f"./models/{TENANT}", settings.models_dir, TENANT)
