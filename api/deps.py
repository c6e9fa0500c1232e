"""Dependencies handed to routes: settings, the Temporal client, the Redis mirror, the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import State
from temporalio.client import Client

from api.limits import AuthFailures, check_rate, client_key
from jobs.service import JobService
from tenanttune.auth import InvalidToken, Principal, decode_token
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings
from tenanttune.temporal import TemporalConnector, TemporalUnavailable
from tenanttune.vocab import valid_company_id


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
# Where api/middleware.py leaves the caller it authenticated (before reading the body).
PRINCIPAL_STATE = "tenanttune_principal"


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from a valid bearer token; each call counts against its tenant's rate limit."""
    principal: Principal | None = getattr(request.state, PRINCIPAL_STATE, None)
    if principal is None:
        token = credentials.credentials if credentials else None
        host = request.client.host if request.client else None
        principal = await authenticate(request.app.state, token, host)
    await check_rate(request, principal)
    return principal


async def authenticate(state: State, token: str | None, client_host: str | None) -> Principal:
    """The caller of a bearer `token` (None: none sent), or 401 with `WWW-Authenticate: Bearer`;
    429 once its address has failed too often (checked before the token is decoded)."""
    failures: AuthFailures = state.auth_failures
    client = client_key(client_host)
    failures.check(client)
    challenge = {"WWW-Authenticate": "Bearer"}
    if not token:
        await failures.record(client)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(mint one with `tenanttune token --company <id>`)",
            headers=challenge,
        )
    try:
        return decode_token(state.settings, token)
    except InvalidToken as exc:
        await failures.record(client)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc), headers=challenge) from exc


def get_jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
MirrorDep = Annotated[JobMirror, Depends(get_mirror)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
JobsDep = Annotated[JobService, Depends(get_jobs)]


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
