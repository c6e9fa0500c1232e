"""Dependencies handed to routes: settings, the Temporal client, the Redis mirror, the caller."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import Client

from api.limits import check_rate
from tenanttune.auth import InvalidToken, Principal, decode_token
from tenanttune.jobs import queue_of, valid_company_id
from tenanttune.mirror import JobMirror
from tenanttune.queues import Queue
from tenanttune.settings import Settings
from tenanttune.temporal import connect


class TemporalUnavailable(Exception):
    """Temporal cannot be reached right now."""


class TemporalConnector:
    """Connects on first use and reconnects after a failure, so the API starts without Temporal."""

    def __init__(self, settings: Settings, timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(connect(self.settings), self.timeout_s)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    raise TemporalUnavailable(
                        f"Temporal at {self.settings.temporal_address} is unreachable: {exc}"
                    ) from exc
            return self._client


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_mirror(request: Request) -> JobMirror:
    mirror: JobMirror = request.app.state.mirror
    return mirror


async def get_temporal(request: Request) -> Client:
    connector: TemporalConnector = request.app.state.temporal
    try:
        return await connector.get()
    except TemporalUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


_bearer = HTTPBearer(auto_error=False)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from a valid bearer token; each call counts against its rate limit."""
    principal = _decode(request, credentials)
    await check_rate(request, principal)
    return principal


def _decode(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(mint one with `tenanttune token --company <id>`)",
            headers=challenge,
        )
    try:
        return decode_token(request.app.state.settings, credentials.credentials)
    except InvalidToken as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers=challenge) from exc


def get_queues(request: Request) -> dict[str, Queue]:
    queues: dict[str, Queue] = request.app.state.queues
    return queues


def get_queue_for_job(request: Request, job_id: str) -> Queue | None:
    queue = queue_of(job_id)
    return get_queues(request).get(queue) if queue else None


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
MirrorDep = Annotated[JobMirror, Depends(get_mirror)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def tenant_of_path(company_id: str, principal: CurrentPrincipal) -> str:
    """The `companyId` in the path, checked for shape and against the caller's token."""
    if not valid_company_id(company_id):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "companyId must be 1-63 characters of lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit, and not a reserved name ('registry')",
        )
    if not principal.may_act_for(company_id):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this token acts for company '{principal.company_id}' only"
        )
    return company_id


CurrentTenant = Annotated[str, Depends(tenant_of_path)]
