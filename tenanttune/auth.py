"""Bearer tokens: JWTs carrying the tenant (`company_id`) and a role.

HS256 with a shared secret (the default), or RS256 verified with a PEM public key or a JWKS
file, for deployments whose identity provider signs the tokens. Exactly one algorithm is
accepted (`JWT_ALGORITHM`): never `none`, never an algorithm a token names for itself, so an
HS256 token forged with the RSA public key as its secret is refused.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt

from tenanttune.settings import DEV_JWT_SECRET, Settings

REQUIRED_CLAIMS = ["sub", "company_id", "role", "exp"]


class InvalidToken(Exception):
    """The token is missing, malformed, expired or wrongly signed."""


class AuthConfigError(RuntimeError):
    """The server's token settings cannot work; the API refuses to start with them."""


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


def check_config(settings: Settings) -> None:
    """Refuse settings that would accept forged tokens or accept none at all."""
    if settings.jwt_algorithm == "HS256":
        if settings.environment != "development" and settings.jwt_secret == DEV_JWT_SECRET:
            raise AuthConfigError("JWT_SECRET is the development default; set a real secret")
        if settings.environment != "development" and len(settings.jwt_secret) < 32:
            raise AuthConfigError("JWT_SECRET must be at least 32 characters in production")
    elif not (settings.jwt_public_key_file or settings.jwt_jwks_file):
        raise AuthConfigError("JWT_ALGORITHM=RS256 needs JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE")
    for path in (settings.jwt_public_key_file, settings.jwt_jwks_file):
        if path is not None and not path.is_file():
            raise AuthConfigError(f"token key file {path} does not exist")


@functools.lru_cache(maxsize=8)
def _read(path: Path, _mtime_ns: int) -> str:
    return path.read_text()


def _file(path: Path) -> str:
    """A key file, re-read when it changes (key rotation without a restart)."""
    return _read(path, path.stat().st_mtime_ns)


def _verification_key(settings: Settings, token: str) -> Any:
    if settings.jwt_algorithm == "HS256":
        check_config(settings)
        return settings.jwt_secret
    if settings.jwt_jwks_file is not None:
        kid = jwt.get_unverified_header(token).get("kid")
        keys = jwt.PyJWKSet.from_json(_file(settings.jwt_jwks_file))
        for key in keys.keys:
            if key.key_id == kid and key.algorithm_name in (None, "RS256"):
                return key.key
        raise InvalidToken(f"invalid token: no key with kid {kid!r} in the server's JWKS")
    assert settings.jwt_public_key_file is not None
    return _file(settings.jwt_public_key_file)


def mint_token(
    settings: Settings,
    company_id: str,
    *,
    admin: bool = False,
    ttl_s: int | None = None,
    subject: str | None = None,
) -> str:
    """A token for the API: HS256 with the secret, or RS256 with JWT_PRIVATE_KEY_FILE."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject or f"{company_id}-{uuid.uuid4().hex[:8]}",
        "company_id": company_id,
        "role": "admin" if admin else "tenant",
        "iat": now,
        "exp": now + (ttl_s if ttl_s is not None else settings.jwt_ttl_s),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_algorithm == "HS256":
        check_config(settings)
        return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    if settings.jwt_private_key_file is None:
        raise AuthConfigError(
            "RS256 tokens come from your identity provider; set JWT_PRIVATE_KEY_FILE to mint one"
        )
    headers = {"kid": settings.jwt_key_id} if settings.jwt_key_id else None
    return jwt.encode(
        claims, _file(settings.jwt_private_key_file), algorithm="RS256", headers=headers
    )


def decode_token(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            _verification_key(settings, token),
            algorithms=[settings.jwt_algorithm],
            issuer=settings.jwt_issuer or None,
            audience=settings.jwt_audience or None,
            options={"require": REQUIRED_CLAIMS, "verify_aud": bool(settings.jwt_audience)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token expired: get a new one") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise InvalidToken(
            f"invalid token: only {settings.jwt_algorithm}-signed tokens are accepted"
        ) from exc
    except jwt.InvalidSignatureError as exc:
        raise InvalidToken("invalid token: its signature does not match this server's key") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidToken(f"invalid token: the '{exc.claim}' claim is required") from exc
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"invalid token: {exc}") from exc
    role, company = claims["role"], claims["company_id"]
    if role not in ("tenant", "admin") or not isinstance(company, str):
        raise InvalidToken("invalid token: role must be 'tenant' or 'admin', company_id a string")
    return Principal(subject=str(claims["sub"]), company_id=company, role=role)


def public_jwks(settings: Settings) -> dict[str, Any]:
    """The JWKS a key file holds (for `tenanttune` tooling and tests)."""
    assert settings.jwt_jwks_file is not None
    return json.loads(_file(settings.jwt_jwks_file))  # type: ignore[no-any-return]
