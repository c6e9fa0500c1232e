"""The FastAPI app: `uvicorn api.app:app`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from api.limits import AuthFailures
from api.middleware import RequestGuard
from api.routes import datasets, health, job_insights, jobs, models, queues
from api.schemas import ERROR_RESPONSES
from jobs import errors
from jobs.service import JobService
from tenanttune import auth, telemetry
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings, get_settings
from tenanttune.temporal import TemporalConnector, TemporalUnavailable

# How the front door's refusals answer over HTTP.
JOB_ERROR_STATUS = {
    errors.JobNotFound: 404,
    errors.JobStateError: 409,
    errors.InvalidJob: 422,
    errors.InvalidReference: 400,
    errors.QuotaExceeded: 429,
    errors.SubmissionBusy: 503,
    errors.JobQueueUnavailable: 503,
}


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
        app.state.jobs = JobService(settings, app.state.mirror, app.state.temporal.get)
        app.state.auth_failures = AuthFailures(settings, app.state.mirror)
        app.state.readiness = health.ReadinessCache(settings.readyz_cache_s)
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

    # The interactive docs and the schema describe every route to anyone: development only.
    development = settings.environment == "development"
    app = FastAPI(
        title="TenantTune",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if development else None,
        redoc_url="/redoc" if development else None,
        openapi_url="/openapi.json" if development else None,
    )
    # Request spans are the parents of the workflow spans (README "Operations").
    telemetry.configure_tracing(settings, "tenanttune-api")
    telemetry.configure_metrics(settings, "tenanttune-api")
    if settings.log_format == "json":
        telemetry.configure_logging(settings)
    FastAPIInstrumentor.instrument_app(app, excluded_urls="/healthz$,/readyz$,//[^/]+/metrics$")

    # Authentication before the body, and body limits while it streams (api/middleware.py).
    app.add_middleware(RequestGuard, settings=settings)

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

    @app.exception_handler(errors.JobError)
    async def _job_error(_: Request, exc: errors.JobError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(
            status_code=JOB_ERROR_STATUS.get(type(exc), 400),
            content={"detail": exc.message},
            headers=headers,
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
