"""Operations endpoints: liveness, readiness with the reason, Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from api.deps import authenticate
from tenanttune import telemetry
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, SLOT_QUEUES
from tenanttune.temporal import TemporalConnector, pollers

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


# (status, HTTP code, each check with its detail) of one readiness check.
Readiness = tuple[str, int, dict[str, dict[str, Any]]]


class ReadinessCache:
    """One readiness check answers every /readyz caller for `ttl_s` seconds, and callers that
    come while it runs wait for that same check: a flood of probes costs Temporal one check."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._task: asyncio.Task[Readiness] | None = None
        self._done_at = 0.0

    async def get(self, check: Callable[[], Awaitable[Readiness]]) -> Readiness:
        task = self._task
        if task is None or (task.done() and self._stale(task)):
            task = self._task = asyncio.create_task(self._run(check))
        # Shielded: a caller that goes away does not cancel the check the others wait for.
        return await asyncio.shield(task)

    def _stale(self, task: asyncio.Task[Readiness]) -> bool:
        failed = task.cancelled() or task.exception() is not None
        return failed or time.monotonic() - self._done_at >= self.ttl_s

    async def _run(self, check: Callable[[], Awaitable[Readiness]]) -> Readiness:
        try:
            return await check()
        finally:
            self._done_at = time.monotonic()


@router.get(
    "/readyz",
    responses={
        401: {"description": "a token was sent and it is not valid"},
        503: {"description": "Temporal is unreachable"},
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Ready, degraded or unavailable (cached READYZ_CACHE_S seconds); with an admin token, also
    each check with its addresses, pollers and hints."""
    detail = False
    if "authorization" in request.headers:  # anonymous probes get the status alone
        scheme, token = get_authorization_scheme_param(request.headers["authorization"])
        host = request.client.host if request.client else None
        caller = await authenticate(
            request.app.state, token if scheme.lower() == "bearer" else None, host
        )
        detail = caller.is_admin
    readiness: ReadinessCache = request.app.state.readiness
    state, code, checks = await readiness.get(lambda: _check_readiness(request))
    body: dict[str, Any] = {"status": state, "checks": checks} if detail else {"status": state}
    return JSONResponse(body, status_code=code)


async def _check_readiness(request: Request) -> Readiness:
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
        # Each job queue, and the activity-only queue of its worker's slots (train_model).
        polled = [(q, q, True) for q in QUEUES] + [(s, q, False) for q, s in SLOT_QUEUES.items()]
        found = await asyncio.gather(
            *(pollers(client, name) for name, _, _ in polled), return_exceptions=True
        )
        for (name, queue, workflows), result in zip(polled, found, strict=True):
            if isinstance(result, BaseException):
                checks[f"queue:{name}"] = {"ok": False, "error": str(result)}
                continue
            ok = bool(result["activity"]) and (bool(result["workflow"]) or not workflows)
            entry: dict[str, Any] = {"ok": ok, "pollers": result["activity"]}
            if not ok:
                entry["hint"] = f"no worker polls it: start `python worker.py --queues {queue}`"
            checks[f"queue:{name}"] = entry

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
    return state, code, checks


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
