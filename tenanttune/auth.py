"""Bearer tokens: JWTs carrying the tenant (`company_id`) and a role.

HS256 with a shared secret (the default), or RS256 verified with a PEM public key or a JWKS
file, for deployments whose identity provider signs the tokens. Exactly one algorithm is
accepted (`JWT_ALGORITHM`): never `none`, never an algorithm a token names for itself, so an
HS256 token forged with the RSA public key as its secret is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt

from tenanttune.settings import Settings

REQUIRED_CLAIMS = ["sub", "company_id", "role", "exp"]
MIN_SECRET_CHARS = 32
# Secrets that were once published (an old built-in development default): refused everywhere.
PUBLISHED_SECRETS = frozenset({"tenanttune-dev-secret-change-me-0123456789"})
LOCAL_SECRET_FILE = "jwt-secret"

logger = logging.getLogger(__name__)


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
    _check_algorithm(settings)
    if settings.environment == "production" and not settings.idempotency_key_secret:
        # Job ids derived from Idempotency-Key are keyed with it (HS256: JWT_SECRET); with no
        # key, anyone could compute another tenant's job id from a key they guess.
        raise AuthConfigError(
            "IDEMPOTENCY_SECRET is not set: with RS256 there is no shared secret to key job ids "
            "with; set a random one of 32+ characters (`openssl rand -hex 32`)"
        )
    for path in (settings.jwt_public_key_file, settings.jwt_jwks_file):
        if path is not None and not path.is_file():
            raise AuthConfigError(f"token key file {path} does not exist")


def _check_algorithm(settings: Settings) -> None:
    """The part of check_config that needs no file system (run on every sign and verify)."""
    if settings.jwt_algorithm == "HS256":
        secret = settings.jwt_secret
        if not secret:
            raise AuthConfigError(
                "JWT_SECRET is not set: set a random one of 32+ characters "
                "(e.g. `openssl rand -hex 32`); `tenanttune up` makes one for the local stack"
            )
        if secret in PUBLISHED_SECRETS:
            raise AuthConfigError("JWT_SECRET is a published default; set a random secret")
        if settings.environment != "development" and len(secret) < MIN_SECRET_CHARS:
            raise AuthConfigError(
                f"JWT_SECRET must be at least {MIN_SECRET_CHARS} characters in production"
            )
        return
    if not (settings.jwt_public_key_file or settings.jwt_jwks_file):
        raise AuthConfigError("JWT_ALGORITHM=RS256 needs JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE")
    # An identity provider signs tokens for many applications with the same keys: without
    # these two, a token it issued for any other app would be accepted here.
    missing = [n for n in ("jwt_issuer", "jwt_audience") if not getattr(settings, n)]
    if missing:
        names = " and ".join(n.upper() for n in missing)
        raise AuthConfigError(
            f"JWT_ALGORITHM=RS256 needs {names}: the `iss` and `aud` your identity provider "
            "puts in tokens for TenantTune, so tokens it issued for other apps are refused"
        )


def local_secret(settings: Settings) -> str:
    """The local stack's HS256 secret: STATE_DIR/jwt-secret, created (random, mode 0600) once.

    For `tenanttune up` and `tenanttune token` on one machine when JWT_SECRET is unset; a
    deployment sets JWT_SECRET itself.
    """
    path = settings.state_dir / LOCAL_SECRET_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if len(existing) >= MIN_SECRET_CHARS:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # readable by others: tighten it, the secret is still ours
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{LOCAL_SECRET_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48) + "\n")
    try:
        if existing:
            draft.replace(path)  # an unusable (short) secret: replaced
        else:
            os.link(draft, path)  # two processes at once: the first one's secret wins
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)
    return path.read_text().strip()


def with_local_secret(settings: Settings) -> Settings:
    """`settings` with the local stack's secret when HS256 has no JWT_SECRET (else unchanged)."""
    if settings.jwt_algorithm != "HS256" or settings.jwt_secret:
        return settings
    return settings.model_copy(update={"jwt_secret": local_secret(settings)})


@functools.lru_cache(maxsize=8)
def _read(path: Path, _mtime_ns: int) -> str:
    return path.read_text()


def _file(path: Path) -> str:
    """A key file, re-read when it changes (key rotation without a restart)."""
    return _read(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse_jwks(path: Path, mtime_ns: int) -> dict[str, jwt.PyJWK]:
    """The RS256 keys of a JWKS file by `kid`; AuthConfigError when it holds none usable."""
    try:
        document = json.loads(_read(path, mtime_ns))
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise AuthConfigError(f"{path} is not a JWKS document (no 'keys' list)")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") != "RSA":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue
            if key.algorithm_name == "RS256" and isinstance(entry.get("kid"), str):
                keys[entry["kid"]] = key
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"{path} cannot be read as a JWKS document: {exc}") from exc
    if not keys:
        raise AuthConfigError(f"{path} holds no usable RS256 key (an RSA key with a 'kid')")
    return keys


def _verification_key(settings: Settings, token: str) -> Any:
    _check_algorithm(settings)
    if settings.jwt_algorithm == "HS256":
        return settings.jwt_secret
    try:
        if settings.jwt_jwks_file is not None:
            path = settings.jwt_jwks_file
            keys = _parse_jwks(path, path.stat().st_mtime_ns)
            kid = jwt.get_unverified_header(token).get("kid")
            key = keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise InvalidToken(f"invalid token: no key with kid {kid!r} in the server's JWKS")
            return key.key
        assert settings.jwt_public_key_file is not None
        return _file(settings.jwt_public_key_file)
    except (AuthConfigError, OSError) as exc:
        # The server's fault, not the caller's: logged for the operator, and the caller gets a
        # 401 that says so (never a 500, never another key).
        logger.error("token verification key unusable: %s", exc)
        raise InvalidToken(
            "invalid token: the server has no usable key to verify it "
            "(JWT_JWKS_FILE / JWT_PUBLIC_KEY_FILE); ask the operator"
        ) from exc


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
        _check_algorithm(settings)
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
    except jwt.InvalidKeyError as exc:
        logger.error("token verification key unusable: %s", exc)
        raise InvalidToken(
            "invalid token: the server has no usable key to verify it "
            "(JWT_JWKS_FILE / JWT_PUBLIC_KEY_FILE); ask the operator"
        ) from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"invalid token: {exc}") from exc
    role, company = claims["role"], claims["company_id"]
    if role not in ("tenant", "admin") or not isinstance(company, str):
        raise InvalidToken("invalid token: role must be 'tenant' or 'admin', company_id a string")
    return Principal(subject=str(claims["sub"]), company_id=company, role=role)


def public_jwks(settings: Settings) -> dict[str, Any]:
    """The JWKS a key file holds (for `tenanttune` tooling and tests)."""
    assert settings.jwt_jwks_file is not None
    return json.loads(_file(settings.jwt_jwks_file))  # type: ignore[no-any-return]
