"""Bearer tokens: who may call, and for which tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tenanttune.auth import AuthConfigError, InvalidToken, check_config, decode_token, mint_token
from tenanttune.settings import DEV_JWT_SECRET, Settings


def test_token_round_trip() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
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
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(InvalidToken, match=reason):
        decode_token(s, make(s))


def test_default_secret_is_refused_in_production() -> None:
    s = Settings(_env_file=None, environment="production", jwt_secret=DEV_JWT_SECRET)  # type: ignore[call-arg]
    with pytest.raises(RuntimeError, match="JWT_SECRET"):
        mint_token(s, "acme")
    from api.app import create_app

    with pytest.raises(RuntimeError, match="JWT_SECRET"):
        create_app(s)


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
    s = Settings(_env_file=None, jwt_algorithm="RS256", jwt_jwks_file=path)  # type: ignore[call-arg]
    claims = {"sub": "x", "company_id": "globex", "role": "tenant", "exp": 2**40}
    token = jwt.encode(claims, keys["2026-b"], algorithm="RS256", headers={"kid": "2026-b"})
    assert decode_token(s, token).company_id == "globex"
    wrong = jwt.encode(claims, keys["2026-a"], algorithm="RS256", headers={"kid": "2026-b"})
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(s, wrong)
    unknown = jwt.encode(claims, keys["2026-a"], algorithm="RS256", headers={"kid": "old"})
    with pytest.raises(InvalidToken, match="no key with kid 'old'"):
        decode_token(s, unknown)


def test_rs256_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    s = Settings(_env_file=None, jwt_algorithm="RS256")  # type: ignore[call-arg]
    with pytest.raises(AuthConfigError, match="JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE"):
        check_config(s)
    from api.app import create_app

    with pytest.raises(RuntimeError, match="refusing to start"):
        create_app(s)


def test_role_claim_is_required() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    token = jwt.encode({"sub": "x", "company_id": "a", "exp": 2**40}, s.jwt_secret, "HS256")
    with pytest.raises(InvalidToken, match="'role' claim is required"):
        decode_token(s, token)
