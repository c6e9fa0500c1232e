"""Operations endpoints: liveness, readiness with the reason, Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from api.deps import TemporalConnector
from tenanttune import telemetry
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES
from tenanttune.temporal import pollers

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Temporal is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    """Temporal and Redis reachable, and a worker polling each task queue; each with a hint."""
    connector: TemporalConnector = request.app.state.temporal
    mirror: JobMirror = request.app.state.mirror
    checks: dict[str, dict[str, Any]] = {}

    async def temporal() -> None:
        address = connector.settings.temporal_address
        try:
            client = await connector.get()
            await client.workflow_service.get_system_info(
                GetSystemInfoRequest(), timeout=timedelta(seconds=3)
            )
        except Exception as exc:  # noqa: BLE001 - any failure = not ready
            checks["temporal"] = {
                "ok": False,
                "address": address,
                "error": str(exc),
                "hint": "start Temporal (`tenanttune up`) or point TEMPORAL_ADDRESS at it",
            }
            return
        checks["temporal"] = {"ok": True, "address": address}
        found = await asyncio.gather(*(pollers(client, q) for q in QUEUES), return_exceptions=True)
        for queue, result in zip(QUEUES, found, strict=True):
            if isinstance(result, BaseException):
                checks[f"queue:{queue}"] = {"ok": False, "error": str(result)}
                continue
            ok = bool(result["workflow"]) and bool(result["activity"])
            entry: dict[str, Any] = {"ok": ok, "pollers": result["activity"]}
            if not ok:
                entry["hint"] = f"no worker polls it: start `python worker.py --queues {queue}`"
            checks[f"queue:{queue}"] = entry

    async def redis() -> None:
        try:
            await mirror.ping()
            checks["redis"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - the mirror is a cache: degraded, not down
            checks["redis"] = {
                "ok": False,
                "error": str(exc),
                "hint": "check REDIS_URL; jobs still run and status answers from Temporal",
            }

    await asyncio.gather(temporal(), redis())
    if not checks["temporal"]["ok"]:
        state, code = "unavailable", 503
    elif all(c["ok"] for c in checks.values()):
        state, code = "ready", 200
    else:
        state, code = "degraded", 200
    return JSONResponse({"status": state, "checks": checks}, status_code=code)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics; queue lengths per state are read from the mirror at scrape time.

    The series name tenants, so on an internet-facing API they need METRICS_TOKEN (a static
    bearer token for the scraper); without one they are served in development only.
    """
    settings = request.app.state.settings
    expected = settings.metrics_token
    if expected:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {expected}".encode()):
            return JSONResponse(
                status_code=401,
                content={"detail": "metrics need 'Authorization: Bearer <METRICS_TOKEN>'"},
                headers={"WWW-Authenticate": "Bearer"},
            )
    elif settings.environment != "development":
        return JSONResponse(
            status_code=403,
            content={"detail": "set METRICS_TOKEN to serve metrics outside development"},
        )
    await _update_queue_gauges(request.app.state.mirror)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _update_queue_gauges(mirror: JobMirror) -> None:
    try:
        for queue in QUEUES:
            telemetry.set_queue_counts(queue, await mirror.counts(queue))
        telemetry.MIRROR_UP.set(1)
    except Exception:  # noqa: BLE001 - report the mirror as down, serve the rest
        telemetry.MIRROR_UP.set(0)


async def refresh_queue_gauges(mirror: JobMirror, every_s: float = 15.0) -> None:
    """Keep the queue-length gauges current for the OTLP exporter (runs until cancelled)."""
    while True:
        await _update_queue_gauges(mirror)
        await asyncio.sleep(every_s)
