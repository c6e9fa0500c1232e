"""The HTTP API's answers to bad requests: clear 4xx, and nothing queued or stored."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import ValidationError

from api.schemas import DeployBody, TrainBody
from tenanttune.settings import Settings
from tenanttune.vocab import queue_of, valid_company_id, valid_tag
from tests.conftest import chat_line, seed_tenant, token

GOOD = {"epochs": 3, "batchSize": 4, "learningRate": 0.0002}


async def test_health(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}


async def test_missing_or_bad_token_is_401(api: httpx.AsyncClient, settings: Settings) -> None:
    r = await api.post("/api/ai/models/acme/train", json=GOOD)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "tenanttune token" in r.json()["detail"]
    r = await api.post(
        "/api/ai/models/acme/train", json=GOOD, headers={"Authorization": "Bearer nonsense"}
    )
    assert r.status_code == 401
    r = await api.get(
        "/api/ai/jobs/train-acme-0123456789abcdef", headers=token(settings, "acme", ttl_s=-5)
    )
    assert r.status_code == 401 and "expired" in r.json()["detail"]


async def test_other_tenant_is_403(api: httpx.AsyncClient, settings: Settings) -> None:
    r = await api.post("/api/ai/models/acme/train", json=GOOD, headers=token(settings, "globex"))
    assert r.status_code == 403
    assert "globex" in r.json()["detail"]


async def test_bad_company_id_is_400(api: httpx.AsyncClient, settings: Settings) -> None:
    r = await api.post(
        "/api/ai/models/ACME..x/train", json=GOOD, headers=token(settings, "ACME..x")
    )
    assert r.status_code == 400
    assert "companyId must be" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1000}, "epochs"),
        ({"batchSize": -1}, "batchSize"),
        ({"learningRate": 5}, "learningRate"),
        ({"learningRate": "fast"}, "learningRate"),
        ({"epochz": 3}, "epochz"),
        ({"targetModules": ["lm_head"]}, "targetModules"),
        ({"version": "../x"}, "version"),
    ],
)
async def test_out_of_range_hyperparameters_are_422(
    api: httpx.AsyncClient, settings: Settings, body: dict[str, object], field: str
) -> None:
    seed_tenant(settings, "acme")
    r = await api.post("/api/ai/models/acme/train", json=body, headers=token(settings, "acme"))
    assert r.status_code == 422
    assert field in r.json()["message"]


async def test_tenant_without_data_is_422(api: httpx.AsyncClient, settings: Settings) -> None:
    r = await api.post("/api/ai/models/nodata/train", json=GOOD, headers=token(settings, "nodata"))
    assert r.status_code == 422
    assert "has no training data" in r.json()["detail"]
    assert "POST /api/ai/datasets/nodata" in r.json()["detail"]


async def test_tenant_with_only_bad_data_is_422(api: httpx.AsyncClient, settings: Settings) -> None:
    tenant = settings.tenant_data_dir("junk")
    tenant.mkdir(parents=True, exist_ok=True)
    (tenant / "x.jsonl").write_text("{nope\n[]\n")
    r = await api.post("/api/ai/models/junk/train", json=GOOD, headers=token(settings, "junk"))
    assert r.status_code == 422
    assert "x.jsonl line 1: not valid JSON" in r.json()["detail"]


async def test_upload_reports_line_errors_and_stores(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    lines = [chat_line(f"question {i}", f"answer {i}") for i in range(12)]
    content = "\n".join(lines[:5] + ["{bad json", '{"prompt": "p"}'] + lines[5:]) + "\n"
    r = await api.post(
        "/api/ai/datasets/uploader",
        headers=token(settings, "uploader"),
        files={"file": ("my data!.jsonl", content.encode())},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["file"] == "my_data.jsonl"
    assert body["report"]["usable"] == 12 and body["report"]["invalid"] == 2
    assert [e["line"] for e in body["report"]["errors"]] == [6, 7]
    assert body["tenantDatasetSize"] == 12
    assert (settings.tenant_data_dir("uploader") / "my_data.jsonl").read_text() == content


async def test_upload_with_nothing_usable_stores_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    r = await api.post(
        "/api/ai/datasets/empty",
        headers=token(settings, "empty"),
        files={"file": ("e.jsonl", b"\xff\xfe\n{x\n")},
    )
    assert r.status_code == 422
    assert r.json()["report"]["errors"][0] == {
        "file": "e.jsonl",
        "line": 1,
        "message": "not valid UTF-8 (byte 0)",
    }
    assert list(settings.tenant_data_dir("empty").iterdir()) == []


async def test_upload_over_the_size_limit_is_413(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    big = (chat_line("q", "a" * 1000) + "\n").encode() * (settings.max_upload_bytes // 1000 + 10)
    r = await api.post(
        "/api/ai/datasets/big", headers=token(settings, "big"), files={"file": ("b.jsonl", big)}
    )
    assert r.status_code == 413
    assert str(settings.max_upload_bytes) in r.json()["detail"]
    stored = settings.tenant_data_dir("big")
    assert not stored.exists() or list(stored.iterdir()) == []


async def test_job_ids_that_do_not_exist_are_404(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    r = await api.get("/api/ai/jobs/not-a-job", headers=token(settings, "acme"))
    assert r.status_code == 404


async def test_reserved_company_ids_are_400(api: httpx.AsyncClient, settings: Settings) -> None:
    """`registry` is the deployed-model registry under MODELS_DIR, never a tenant."""
    r = await api.post(
        "/api/ai/models/registry/deploy",
        headers=token(settings, "registry"),
        json={"modelPath": "x", "version": "1"},
    )
    assert r.status_code == 400 and "reserved" in r.json()["detail"]


async def test_metrics_need_the_scrape_token_when_one_is_set(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.metrics_token = "scrape-secret"
    try:
        r = await api.get("/metrics")
        assert r.status_code == 401 and "METRICS_TOKEN" in r.json()["detail"]
        r = await api.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert r.status_code == 200 and "tenanttune_" in r.text
        settings.metrics_token = ""
        settings.environment = "production"
        assert (await api.get("/metrics")).status_code == 403  # tenant names stay private
    finally:
        settings.metrics_token = ""
        settings.environment = "development"


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (valid_company_id, "acme"),
        (valid_tag, "m1"),
        (lambda v: queue_of(v) is not None, "train-acme-0123456789abcdef"),
    ],
)
def test_ids_and_tags_are_whole_strings(check: Callable[[str], bool], value: str) -> None:
    """F13: `re.match` with `$` accepts a trailing newline; an id or tag is the whole string."""
    assert check(value)
    for hostile in (f"{value}\n", f"{value}\r\n", f"{value}\n{value}", f"\n{value}", f"{value} "):
        assert not check(hostile), repr(hostile)


def test_body_patterns_refuse_a_trailing_newline() -> None:
    """F13: pydantic's `pattern=` (Rust regex: `$` is the end of the text) is strict too."""
    for body in ({"version": "m1\n"}, {"deployVersion": "m1\n"}, {"jobId": "k1\n"}):
        with pytest.raises(ValidationError):
            TrainBody(**body)
    assert TrainBody(version="m1", deployVersion="m1", jobId="k1").version == "m1"
    with pytest.raises(ValidationError):
        DeployBody(modelPath="latest", version="1.0", quantize="q4_K_M\n")


async def test_bad_ids_in_the_path_are_refused(api: httpx.AsyncClient, settings: Settings) -> None:
    """F13 over HTTP: a newline in the companyId or job id is never a tenant or a job."""
    admin = token(settings, "ops", admin=True)
    r = await api.post("/api/ai/models/mallory%0A/train", json=GOOD, headers=admin)
    assert r.status_code == 400 and "companyId must be" in r.json()["detail"]
    r = await api.get("/api/ai/jobs/train-mallory-0123456789abcdef%0A", headers=admin)
    assert r.status_code == 404, r.text
