"""Bearer tokens: who may call, and for which tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tenanttune.auth import (
    PUBLISHED_SECRETS,
    AuthConfigError,
    InvalidToken,
    check_config,
    decode_token,
    local_secret,
    mint_token,
    with_local_secret,
)
from tenanttune.settings import Settings
from tests.conftest import TEST_REDIS_URL

SECRET = "k" * 8 + secrets.token_hex(16)

IDEMPOTENCY = "idempotency-secret-for-the-tests-0123456789"


def hs256(**kw: Any) -> Settings:
    """Settings with a secret of their own (none is built in)."""
    return Settings(_env_file=None, **{"jwt_secret": SECRET, **kw})  # type: ignore[call-arg]


def test_token_round_trip() -> None:
    s = hs256()
    p = decode_token(s, mint_token(s, "acme"))
    assert (p.company_id, p.role, p.is_admin) == ("acme", "tenant", False)
    assert p.may_act_for("acme") and not p.may_act_for("globex")
    admin = decode_token(s, mint_token(s, "ops", admin=True))
    assert admin.may_act_for("globex")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: mint_token(s, "acme", ttl_s=-10), "expired"),
        (
            lambda _: jwt.encode(
                {"sub": "x", "company_id": "acme", "exp": 2**40},
                "other-key-0123456789abcdef0123456789",
                algorithm="HS256",
            ),
            "invalid",
        ),
        (
            lambda _: jwt.encode(
                {"sub": "x", "company_id": "acme", "exp": 2**40}, None, algorithm="none"
            ),
            "invalid",
        ),
        (
            lambda s: jwt.encode({"sub": "x", "exp": 2**40}, s.jwt_secret, algorithm="HS256"),
            "company_id",
        ),
        (lambda _: "not.a.jwt", "invalid"),
    ],
)
def test_bad_tokens_are_refused(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    s = hs256()
    with pytest.raises(InvalidToken, match=reason):
        decode_token(s, make(s))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_production_is_the_default_and_no_secret_is_built_in() -> None:
    """F9: with nothing configured (the Dockerfile's case) the API is in production and refuses
    to start, and nothing signs a token; development must be asked for, and even there the
    secret that used to be built in opens nothing."""
    from api.app import create_app

    bare = Settings(_env_file=None)  # type: ignore[call-arg]
    assert bare.environment == "production" and bare.jwt_secret == ""
    for s in (bare, hs256(jwt_secret="short-but-not-empty"), hs256(jwt_secret="")):
        with pytest.raises(AuthConfigError, match="JWT_SECRET"):
            check_config(s)
        with pytest.raises(AuthConfigError, match="JWT_SECRET"):
            mint_token(s, "acme")
        with pytest.raises(RuntimeError, match="refusing to start: JWT_SECRET"):
            create_app(s)
    for published in PUBLISHED_SECRETS:
        for environment in ("production", "development"):
            s = hs256(jwt_secret=published, environment=environment)
            with pytest.raises(AuthConfigError, match="published"):
                check_config(s)
            forged = jwt.encode(
                {"sub": "x", "company_id": "acme", "role": "admin", "exp": 2**40},
                published,
                algorithm="HS256",
            )
            with pytest.raises(AuthConfigError):
                decode_token(s, forged)
    # Development, explicitly: a short secret is allowed there, never an empty one.
    dev = hs256(environment="development", jwt_secret="dev-only")
    assert decode_token(dev, mint_token(dev, "acme")).company_id == "acme"
    with pytest.raises(AuthConfigError, match="not set"):
        check_config(hs256(environment="development", jwt_secret=""))


def test_the_local_secret_is_random_private_and_shared_by_the_tools(tmp_path: Path) -> None:
    """F9: `tenanttune up` and `tenanttune token` sign with STATE_DIR/jwt-secret when JWT_SECRET
    is unset: made once (0600), random per state dir, read back by every later call."""
    s = Settings(_env_file=None, state_dir=tmp_path / "state")  # type: ignore[call-arg]
    first = local_secret(s)
    path = tmp_path / "state" / "jwt-secret"
    assert len(first) >= 32 and path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_secret(s) == first
    other = Settings(_env_file=None, state_dir=tmp_path / "other")  # type: ignore[call-arg]
    assert local_secret(other) != first
    signing = with_local_secret(s)
    check_config(signing)  # good enough for production
    assert signing.jwt_secret == first and s.jwt_secret == ""
    assert with_local_secret(hs256()).jwt_secret == SECRET  # a configured secret wins
    # The API given that secret accepts the tool's tokens; one with another secret does not.
    server = hs256(jwt_secret=first)
    assert decode_token(server, mint_token(signing, "acme")).company_id == "acme"
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(hs256(), mint_token(signing, "acme"))
    path.chmod(0o644)
    assert local_secret(s) == first and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tenanttune_token_uses_the_local_secret_without_jwt_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from tenanttune.settings import get_settings

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.delenv("ENVIRONMENT", raising=False)
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["token", "--company", "acme"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    server = hs256(jwt_secret=(tmp_path / "state" / "jwt-secret").read_text().strip())
    assert decode_token(server, token).company_id == "acme"


def _rsa_pem(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / f"{name}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def test_rs256_with_a_public_key_and_no_algorithm_confusion(tmp_path: Path) -> None:
    private, public = _rsa_pem(tmp_path, "idp")
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        environment="production",
        jwt_algorithm="RS256",
        idempotency_secret=IDEMPOTENCY,
        jwt_public_key_file=public,
        jwt_private_key_file=private,
        jwt_issuer="https://idp.example",
        jwt_audience="tenanttune",
    )
    check_config(s)  # no JWT_SECRET is needed with RS256
    p = decode_token(s, mint_token(s, "acme"))
    assert (p.company_id, p.role) == ("acme", "tenant")
    claims = {"sub": "x", "company_id": "acme", "role": "admin", "exp": 2**40}
    full = {**claims, "iss": "https://idp.example", "aud": "tenanttune"}

    # The classic confusion: HS256 "signed" with the public key as the shared secret.
    # (PyJWT will not sign that way, so the forgery is made by hand, as an attacker would.)
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(full).encode())
    mac = hmac.new(public.read_bytes(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + b64(mac)).decode()
    with pytest.raises(InvalidToken, match="only RS256"):
        decode_token(s, forged)
    other, _ = _rsa_pem(tmp_path, "attacker")
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(s, jwt.encode(full, other.read_text(), algorithm="RS256"))
    with pytest.raises(InvalidToken, match="iss"):
        decode_token(s, jwt.encode(claims, private.read_text(), algorithm="RS256"))
    wrong_aud = {**full, "aud": "someone-else"}
    with pytest.raises(InvalidToken, match="Audience"):
        decode_token(s, jwt.encode(wrong_aud, private.read_text(), algorithm="RS256"))


def test_rs256_with_a_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    keys = {}
    for kid in ("2026-a", "2026-b"):
        private, _ = _rsa_pem(tmp_path, kid)
        keys[kid] = private.read_text()
    jwks = {
        "keys": [
            {
                **json.loads(
                    jwt.algorithms.RSAAlgorithm.to_jwk(
                        serialization.load_pem_private_key(pem.encode(), None).public_key()  # type: ignore[arg-type]
                    )
                ),
                "kid": kid,
                "use": "sig",
                "alg": "RS256",
            }
            for kid, pem in keys.items()
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        jwt_algorithm="RS256",
        idempotency_secret=IDEMPOTENCY,
        jwt_jwks_file=path,
        jwt_issuer="https://idp.example",
        jwt_audience="tenanttune",
    )
    claims = {
        "sub": "x",
        "company_id": "globex",
        "role": "tenant",
        "exp": 2**40,
        "iss": "https://idp.example",
        "aud": "tenanttune",
    }
    token = jwt.encode(claims, keys["2026-b"], algorithm="RS256", headers={"kid": "2026-b"})
    assert decode_token(s, token).company_id == "globex"
    wrong = jwt.encode(claims, keys["2026-a"], algorithm="RS256", headers={"kid": "2026-b"})
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(s, wrong)
    unknown = jwt.encode(claims, keys["2026-a"], algorithm="RS256", headers={"kid": "old"})
    with pytest.raises(InvalidToken, match="no key with kid 'old'"):
        decode_token(s, unknown)


def test_rs256_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        idempotency_secret=IDEMPOTENCY,
        jwt_algorithm="RS256",
        jwt_issuer="idp",
        jwt_audience="tenanttune",
    )
    with pytest.raises(AuthConfigError, match="JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE"):
        check_config(s)
    from api.app import create_app

    with pytest.raises(RuntimeError, match="refusing to start"):
        create_app(s)


def test_role_claim_is_required() -> None:
    s = hs256()
    token = jwt.encode({"sub": "x", "company_id": "a", "exp": 2**40}, s.jwt_secret, "HS256")
    with pytest.raises(InvalidToken, match="'role' claim is required"):
        decode_token(s, token)


def test_rs256_needs_an_issuer_and_an_audience(tmp_path: Path) -> None:
    """F14: an identity provider signs tokens for many apps with the same key; without `iss` and
    `aud` pinned, a token it issued for another app would be accepted here."""
    from api.app import create_app

    private, public = _rsa_pem(tmp_path, "idp")
    pinned = {"jwt_issuer": "https://idp.example", "jwt_audience": "tenanttune"}
    for missing, named in (("jwt_issuer", "JWT_ISSUER"), ("jwt_audience", "JWT_AUDIENCE")):
        kept = {k: v for k, v in pinned.items() if k != missing}
        s = Settings(  # type: ignore[call-arg]
            _env_file=None,
            idempotency_secret=IDEMPOTENCY,
            jwt_algorithm="RS256",
            jwt_public_key_file=public,
            **kept,
        )
        with pytest.raises(AuthConfigError, match=named):
            check_config(s)
        with pytest.raises(RuntimeError, match=f"refusing to start: .*{named}"):
            create_app(s)
        other_app = {"sub": "x", "company_id": "acme", "role": "admin", "exp": 2**40}
        other_app |= {"iss": "https://idp.example", "aud": "another-app"}
        with pytest.raises(AuthConfigError):  # never a token accepted with this config
            decode_token(s, jwt.encode(other_app, private.read_text(), algorithm="RS256"))
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        idempotency_secret=IDEMPOTENCY,
        jwt_algorithm="RS256",
        jwt_public_key_file=public,
        **pinned,
    )
    check_config(s)
    other_app = {"sub": "x", "company_id": "acme", "role": "admin", "exp": 2**40}
    other_app |= {"iss": "https://idp.example", "aud": "another-app"}
    with pytest.raises(InvalidToken, match="Audience"):
        decode_token(s, jwt.encode(other_app, private.read_text(), algorithm="RS256"))


def _rsa_jwk(pem: str, **extra: Any) -> dict[str, Any]:
    public = serialization.load_pem_private_key(pem.encode(), None).public_key()
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), **extra}  # type: ignore[arg-type]


UNUSABLE_JWKS = {
    "empty file": "",
    "not JSON": "{keys: nope",
    "a list": "[1]",
    "no keys": json.dumps({"keys": []}),
    "keys not a list": json.dumps({"keys": 5}),
    "only a shared secret (kty oct)": json.dumps(
        {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1", "alg": "HS256"}]}
    ),
    "an EC key": json.dumps(
        {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k1"}]}
    ),
    "a broken RSA key": json.dumps({"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB", "kid": "k1"}]}),
    "an RSA key for RS512": "RS512",
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_JWKS))
async def test_a_jwks_without_a_usable_key_is_401_never_500(tmp_path: Path, case: str) -> None:
    """F14: a JWKS file the server cannot use is the server's fault: every token is refused with
    a 401 that says so (and an error in the log), never a 500 and never another key."""
    import httpx

    from api.app import create_app

    private, _ = _rsa_pem(tmp_path, "idp")
    document = UNUSABLE_JWKS[case]
    if document == "RS512":
        document = json.dumps({"keys": [_rsa_jwk(private.read_text(), kid="k1", alg="RS512")]})
    path = tmp_path / "jwks.json"
    path.write_text(document)
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        jwt_algorithm="RS256",
        idempotency_secret=IDEMPOTENCY,
        jwt_jwks_file=path,
        jwt_issuer="https://idp.example",
        jwt_audience="tenanttune",
        redis_url=TEST_REDIS_URL,
        redis_prefix=f"jwks-{secrets.token_hex(4)}",
    )
    claims = {"sub": "x", "company_id": "acme", "role": "tenant", "exp": 2**40}
    claims |= {"iss": "https://idp.example", "aud": "tenanttune"}
    token = jwt.encode(claims, private.read_text(), algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(InvalidToken, match="no usable key"):
        decode_token(s, token)
    app = create_app(s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"Authorization": f"Bearer {token}"}
            r = await client.get("/api/ai/models/acme/jobs", headers=headers)
            assert r.status_code == 401, r.text
            assert "no usable key" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.post("/api/ai/models/acme/train", json={}, headers=headers)
            assert r.status_code == 401, r.text
    # Fixed in place, the same token works without a restart (the file is re-read).
    path.write_text(json.dumps({"keys": [_rsa_jwk(private.read_text(), kid="k1")]}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert decode_token(s, token).company_id == "acme"


def test_rs256_in_production_needs_an_idempotency_secret(tmp_path: Path) -> None:
    """Job ids from Idempotency-Key are keyed with a server secret; RS256 has none of its own."""
    _, public = _rsa_pem(tmp_path, "idp")
    kept = {"jwt_issuer": "idp", "jwt_audience": "tenanttune", "jwt_public_key_file": public}
    s = Settings(_env_file=None, jwt_algorithm="RS256", **kept)  # type: ignore[call-arg]
    with pytest.raises(AuthConfigError, match="IDEMPOTENCY_SECRET"):
        check_config(s)
    check_config(s.model_copy(update={"idempotency_secret": IDEMPOTENCY}))
