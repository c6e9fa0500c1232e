"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tenanttune.settings import Settings, TenantLimits
from tests.conftest import seed_tenant, token
from tests.integration.jobs import FAST, TENANT, follow


@pytest.fixture(scope="session")
async def trained(api: httpx.AsyncClient, settings: Settings, worker: None) -> dict[str, Any]:
    """One finished training job of the tenant, shared by the tests here."""
    seed_tenant(settings, TENANT, lines=120)
    headers = token(settings, TENANT)
    r = await api.post(
        f"/api/ai/models/{TENANT}/train", json={**FAST, "epochs": 1}, headers=headers
    )
    job = (await follow(api, r.json()["jobId"], headers))[-1]
    assert job["state"] == "completed", job
    return job["result"]  # type: ignore[no-any-return]


@pytest.fixture
def plan_limits(settings: Settings) -> Iterator[dict[str, TenantLimits]]:
    """Tenants' plans (TENANT_LIMITS) for one test; the live app reads these settings."""
    settings.tenant_limits = {}
    yield settings.tenant_limits
    settings.tenant_limits = {}
