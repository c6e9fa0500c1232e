"""The FastAPI app: `uvicorn api.app:app`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from api.deps import TemporalConnector, TemporalUnavailable
from api.routes import datasets, health, job_insights, jobs, models, queues
from api.schemas import ERROR_RESPONSES
from tenanttune import auth, telemetry
from tenanttune.mirror import JobMirror
from tenanttune.queues import Queue
from tenanttune.settings import QUEUES, Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    try:
        auth.check_config(settings)
    except auth.AuthConfigError as exc:
        raise RuntimeError(f"refusing to start: {exc}") from exc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.temporal = TemporalConnector(settings)
        app.state.mirror = JobMirror.from_url(
            settings.redis_url, settings.redis_prefix, settings.redis_timeout_s
        )
        app.state.queues = {
            name: Queue(name, app.state.mirror, app.state.temporal.get) for name in QUEUES
        }
        # Over OTLP nobody scrapes /metrics: refresh the queue-length gauges on a timer.
        gauges = (
            asyncio.create_task(health.refresh_queue_gauges(app.state.mirror))
            if settings.otel_exporter_otlp_endpoint
            else None
        )
        yield
        if gauges:
            gauges.cancel()
        await app.state.mirror.close()

    app = FastAPI(title="TenantTune", version="0.1.0", lifespan=lifespan)
    # Request spans are the parents of the workflow spans (README "Operations").
    telemetry.configure_tracing(settings, "tenanttune-api")
    telemetry.configure_metrics(settings, "tenanttune-api")
    if settings.log_format == "json":
        telemetry.configure_logging(settings)
    FastAPIInstrumentor.instrument_app(app, excluded_urls="/healthz$,/readyz$,//[^/]+/metrics$")

    body_limit = settings.max_upload_bytes + 1024 * 1024  # multipart framing on top

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        # Refuse an oversized body before it is read (and spooled to disk) at all.
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_limit:
            return JSONResponse(
                status_code=413,
                content={"detail": f"request body over the {settings.max_upload_bytes} byte limit"},
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        ]
        return JSONResponse(
            status_code=422,
            content={
                "success": False,
                "message": "; ".join(problems),
                "detail": jsonable_encoder(exc.errors()),
            },
        )

    @app.exception_handler(TemporalUnavailable)
    async def _temporal_down(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    for router in (
        health.router,
        models.router,
        jobs.router,
        job_insights.router,
        queues.router,
        datasets.router,
    ):
        app.include_router(router, responses=None if router is health.router else ERROR_RESPONSES)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.app:app` builds the app on first access, after settings are in the env.
    if name == "app":
        return create_app()
    raise AttributeError(name)
