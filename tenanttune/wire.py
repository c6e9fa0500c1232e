"""The one wire format: camelCase keys in every JSON a client reads (results, details, events)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tenanttune.settings import Settings


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def to_wire(value: Any) -> Any:
    """Dataclasses and dicts with their keys in camelCase, recursively; other values as they are.

    Already camelCase keys are unchanged, so converting twice is harmless.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {camel(str(k)): to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def _roots(settings: Settings, company_id: str) -> list[tuple[str, str]]:
    """Server directories and what a tenant sees instead, most specific first."""
    pairs = [
        (settings.models_dir / company_id, ""),  # modelPath: what POST .../deploy takes
        (settings.data_dir / "tenants" / company_id, ""),  # the tenant's own file names
        (settings.state_dir / "base", ""),  # the built-in base: its name
        (settings.models_dir, ""),  # e.g. a local deployment's registry entry
        (settings.data_dir, "data/"),
        (settings.state_dir, "state/"),
    ]
    out = []
    for path, shown in pairs:
        for form in {str(path).rstrip("/"), str(path.resolve())}:
            out.append((form + "/", shown))
    return sorted(out, key=lambda pair: len(pair[0]), reverse=True)


def public_text(text: str, settings: Settings, company_id: str) -> str:
    """A message with the server's directories taken out (a failure reason, a path)."""
    for root, shown in _roots(settings, company_id):
        text = text.replace(root, shown)
    return text


def public_result(value: Any, settings: Settings, company_id: str) -> Any:
    """A job result as its tenant reads it: camelCase keys, and no server path — paths inside
    the tenant's models dir are relative to it (what `POST .../deploy` takes as modelPath)."""

    def visit(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: visit(x) for k, x in v.items()}
        if isinstance(v, list):
            return [visit(x) for x in v]
        if isinstance(v, str) and "/" in v:
            return public_text(v, settings, company_id)
        return v

    return visit(to_wire(value))
