"""Deployment jobs for real: merge, convert to GGUF, publish to the local registry, llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenanttune.settings import Settings
from tests.conftest import model_dir, token
from tests.integration.jobs import FAST, TENANT, deploy, follow
from tests.models import mute_model
from training.convert import inspect
from training.infer import generate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]


async def test_local_deployment_end_to_end(
    api: httpx.AsyncClient, settings: Settings, trained: dict[str, Any]
) -> None:
    version_dir = model_dir(settings, TENANT, trained)
    out = await deploy(api, settings, f"./models/{TENANT}/{version_dir.name}", "1.0")
    assert out["accepted"]["modelName"] == f"tiny-mistral-company-{TENANT}:1.0"
    final = out["final"]
    assert final["state"] == "completed", final
    assert [s["progress"] for s in out["seen"]] == sorted(s["progress"] for s in out["seen"])
    result = final["result"]
    assert result["modelName"] == f"tiny-mistral-company-{TENANT}:1.0"
    assert result["target"] == "local"
    registry = settings.models_dir / result["location"]
    assert registry == settings.registry_dir / f"tiny-mistral-company-{TENANT}" / "1.0"
    meta = json.loads((registry / "metadata.json").read_text())
    assert meta["digest"] == result["digest"] and meta["source_job"] == version_dir.name
    modelfile = (registry / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "[INST]"' in modelfile
    verification = result["verification"]
    assert verification["text"].strip() and verification["tokens"] > 0
    assert verification["tokensPerS"] > 0

    # The published GGUF is a real llama.cpp model that answers.
    answer = generate(registry / "model.gguf", "[INST] How do I update my card? [/INST]")
    assert answer.text.strip() and answer.tokens > 0
    assert not list(registry.parent.glob(".*")), "no temp or kept-aside dirs are left"

    # Deploying the same model again under another tag reuses the GGUF ("convert if needed").
    gguf = settings.models_dir / TENANT / result["ggufPath"]
    mtime = gguf.stat().st_mtime_ns
    again = await deploy(api, settings, f"{TENANT}/{version_dir.name}", "1.1")
    assert again["final"]["state"] == "completed"
    assert gguf.stat().st_mtime_ns == mtime
    assert (settings.registry_dir / f"tiny-mistral-company-{TENANT}" / "1.0").exists()


async def test_failed_verification_removes_the_model_and_keeps_the_previous(
    api: httpx.AsyncClient, settings: Settings, trained: dict[str, Any], tiny_base: Path
) -> None:
    version = trained["modelPath"]
    good = await deploy(api, settings, f"{TENANT}/{version}", "2.0")
    assert good["final"]["state"] == "completed"
    registry = settings.models_dir / good["final"]["result"]["location"]
    good_digest = json.loads((registry / "metadata.json").read_text())["digest"]

    mute_model(tiny_base, settings.models_dir / TENANT / "mute")
    bad = await deploy(api, settings, f"{TENANT}/mute", "2.0")
    final = bad["final"]
    assert final["state"] == "failed"
    assert "verifying failed" in final["failedReason"]
    assert "empty answer" in final["failedReason"]
    assert "previous version restored" in final["failedReason"]
    assert json.loads((registry / "metadata.json").read_text())["digest"] == good_digest
    assert not list(registry.parent.glob(".*"))


async def test_corrupt_weights_fail_once_with_a_reason(
    api: httpx.AsyncClient, settings: Settings, trained: dict[str, Any]
) -> None:
    broken = settings.models_dir / TENANT / "broken"
    shutil.copytree(model_dir(settings, TENANT, trained), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64 + b"not safetensors")
    out = await deploy(api, settings, f"{TENANT}/broken", "3.0")
    final = out["final"]
    assert final["state"] == "failed"
    assert final["failedReason"].startswith("converting failed: cannot merge")
    assert not (settings.registry_dir / f"tiny-mistral-company-{TENANT}" / "3.0").exists()
    assert not list(broken.glob("*.gguf")) and not list(broken.glob(".*")), "no partial files"


async def test_auto_deploy_after_training(
    api: httpx.AsyncClient, settings: Settings, trained: dict[str, Any]
) -> None:
    headers = token(settings, TENANT)
    body = {**FAST, "epochs": 1, "autoDeploy": True, "deployVersion": "auto"}
    r = await api.post(f"/api/ai/models/{TENANT}/train", json=body, headers=headers)
    final = (await follow(api, r.json()["jobId"], headers, timeout_s=400))[-1]
    assert final["state"] == "completed", final
    deployment = final["result"]["deployment"]
    assert deployment["state"] == "completed", deployment
    assert deployment["modelName"] == f"tiny-mistral-company-{TENANT}:auto"
    child = (await api.get(f"/api/ai/jobs/{deployment['jobId']}", headers=headers)).json()
    assert child["state"] == "completed" and child["queue"] == "model-deployment"
    assert (
        settings.registry_dir / f"tiny-mistral-company-{TENANT}" / "auto" / "model.gguf"
    ).exists()


def test_gguf_matches_the_hf_model(
    tmp_path: Path, trained: dict[str, Any], settings: Settings
) -> None:
    """The converter's output has the HF model's tensors and vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.convert import convert_model, merge

    merged = merge(model_dir(settings, TENANT, trained), tmp_path / "merged")
    info = convert_model(model_dir(settings, TENANT, trained), tmp_path / "m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(merged))
    assert info.architecture == "llama"
    assert info.tensor_count == len(hf.state_dict())
    assert info.vocab_size == AutoTokenizer.from_pretrained(str(merged)).vocab_size
    assert inspect(tmp_path / "m.gguf") == info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
