"""Bearer tokens: who may call, and for which tenant."""

from __future__ import annotations

import jwt
import pytest

from tenanttune.auth import InvalidToken, decode_token, mint_token
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
