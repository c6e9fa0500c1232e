"""Where a deploy request's `modelPath` may point: only inside the caller's own models dir."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ModelPathError(ValueError):
    """The modelPath is not allowed or holds no model; the message says which."""


def holds_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    if not path.is_dir():
        return False
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        return True
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return True
    return any(path.glob("*.gguf"))


def latest_version(tenant_root: Path) -> Path | None:
    """The newest registered model version of a tenant (by its manifest's created_at)."""
    versions = []
    for manifest in tenant_root.glob("*/manifest.json"):
        try:
            created = json.loads(manifest.read_text()).get("created_at", "")
        except ValueError:
            continue
        versions.append((created, manifest.parent))
    return max(versions)[1] if versions else None


def resolve_model_path(raw: str, models_dir: Path, company_id: str) -> Path:
    """Resolve `raw` (absolute, `./models/<company>/<v>`, `<company>/<v>` or `<v>`) safely."""
    if not raw.strip() or "\x00" in raw:
        raise ModelPathError("modelPath is empty")
    if URL_RE.match(raw):
        raise ModelPathError("modelPath must be a path inside your models directory, not a URL")
    pure = PurePosixPath(raw)
    if ".." in pure.parts:
        raise ModelPathError("modelPath must not contain '..'")
    tenant_root = (models_dir / company_id).resolve()
    if pure.is_absolute():
        candidate = Path(pure)
    else:
        parts = [p for p in pure.parts if p != "."]
        if parts and parts[0] == models_dir.name:
            parts = parts[1:]
        if parts and parts[0] == company_id:
            parts = parts[1:]
        candidate = tenant_root.joinpath(*parts)
    # resolve() follows symlinks, so a link inside the tenant dir pointing out is caught here.
    resolved = candidate.resolve()
    if resolved != tenant_root and tenant_root not in resolved.parents:
        raise ModelPathError(
            f"modelPath must be inside your models directory ({models_dir.name}/{company_id}/)"
        )
    if resolved == tenant_root:
        latest = latest_version(tenant_root)
        if latest is None:
            raise ModelPathError(f"company '{company_id}' has no trained model yet")
        resolved = latest
    if not holds_model(resolved):
        raise ModelPathError(
            f"no model at {raw!r}: expected a LoRA adapter (adapter_config.json + "
            "adapter_model.safetensors), a model (config.json + *.safetensors) or a .gguf file"
        )
    return resolved


def manifest_of(path: Path) -> dict[str, Any]:
    """The manifest.json that registration wrote next to a trained model ({} if none)."""
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return data
