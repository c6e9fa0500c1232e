"""Bearer tokens: HS256 JWTs carrying the tenant (`company_id`) and a role."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

import jwt

from tenanttune.settings import DEV_JWT_SECRET, Settings

ALGORITHMS = ["HS256"]  # pinned: never `none`, never an algorithm named by the token


class InvalidToken(Exception):
    """The token is missing, malformed, expired or wrongly signed."""


@dataclass(frozen=True)
class Principal:
    subject: str
    company_id: str
    role: Literal["tenant", "admin"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_act_for(self, company_id: str) -> bool:
        return self.is_admin or self.company_id == company_id


def _secret(settings: Settings) -> str:
    if settings.environment != "development" and settings.jwt_secret == DEV_JWT_SECRET:
        raise RuntimeError("JWT_SECRET is the development default; set a real secret")
    return settings.jwt_secret


def mint_token(
    settings: Settings,
    company_id: str,
    *,
    admin: bool = False,
    ttl_s: int | None = None,
    subject: str | None = None,
) -> str:
    now = int(time.time())
    claims = {
        "sub": subject or f"{company_id}-{uuid.uuid4().hex[:8]}",
        "company_id": company_id,
        "role": "admin" if admin else "tenant",
        "iat": now,
        "exp": now + (ttl_s if ttl_s is not None else settings.jwt_ttl_s),
    }
    return jwt.encode(claims, _secret(settings), algorithm=ALGORITHMS[0])


def decode_token(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            _secret(settings),
            algorithms=ALGORITHMS,
            options={"require": ["exp", "sub", "company_id"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"invalid token: {exc}") from exc
    role = claims.get("role", "tenant")
    if role not in ("tenant", "admin") or not isinstance(claims["company_id"], str):
        raise InvalidToken("invalid token: bad role or company_id claim")
    return Principal(subject=str(claims["sub"]), company_id=claims["company_id"], role=role)
