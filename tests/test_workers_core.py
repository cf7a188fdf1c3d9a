"""The workers' pure decisions, without a broker: origins, link age, Doshii state, bodies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shared.errors import PermanentError
from shared.models import DoshiiStatus, DoshiiUpdate, KeyClaims, Voucher
from shared.partners import retry_after_s
from shared.settings import PdfOrigin
from tests.support.vouchers import encode, voucher
from workers.doshii import already_done, why_not
from workers.pdfs import check_origin, link_expired
from workers.reservations import mismatch

ALLOWED = [PdfOrigin.parse("cdn.example"), PdfOrigin.parse("http://127.0.0.1:8091")]


@pytest.mark.parametrize(
    "url",
    ["https://cdn.example/v.pdf?sig=1", "https://CDN.example:443/v.pdf", "http://127.0.0.1:8091/x"],
)
def test_allowed_origins_pass(url: str) -> None:
    check_origin(url, ALLOWED)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://cdn.example/v.pdf", "not allowed"),  # plain http only where listed
        ("https://cdn.example:8443/v.pdf", "not allowed"),
        ("https://cdn.example.evil.test/v.pdf", "not allowed"),
        ("http://127.0.0.1:8092/x", "not allowed"),
        ("https://user:pw@cdn.example/v.pdf", "credentials"),
        ("ftp://cdn.example/v.pdf", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://[::1/x", "not a URL"),
    ],
)
def test_other_origins_are_refused(url: str, reason: str) -> None:
    with pytest.raises(PermanentError, match=reason):
        check_origin(url, ALLOWED)


def test_refusal_never_repeats_the_query_string() -> None:
    with pytest.raises(PermanentError) as raised:
        check_origin("https://other.example/v.pdf?X-Amz-Signature=secret", ALLOWED)
    assert "secret" not in str(raised.value)


def test_link_age_counts_from_send_date() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    fresh = Voucher.model_validate_json(encode(voucher("READY", sendDate="2026-01-01T11:30:00Z")))
    stale = Voucher.model_validate_json(encode(voucher("READY", sendDate="2026-01-01T10:30:00Z")))
    assert not link_expired(fresh, None, now)
    assert link_expired(stale, None, now)
    undated = Voucher.model_validate_json(encode(voucher("RESERVED")))
    assert link_expired(undated, now - timedelta(hours=2), now)
    assert not link_expired(undated, None, now)


def update(status: DoshiiStatus, **fields: object) -> DoshiiUpdate:
    return DoshiiUpdate(
        location_id="loc",
        request_id="42",
        voucher_id=uuid.uuid4(),
        coupon_id="AGYPMNVXPJ",
        status=status,
        **fields,
    )


def test_already_done_needs_the_same_amount_and_reference() -> None:
    wanted = update(DoshiiStatus.ACTIVATED, amount_cents=2500, reference="AGYPMNVXPJ")
    assert already_done(
        {"status": "activated", "amount": "2500", "reference": "AGYPMNVXPJ"}, wanted
    )
    assert not already_done(
        {"status": "activated", "amount": "999", "reference": "AGYPMNVXPJ"}, wanted
    )
    assert not already_done({"status": "activated", "amount": "2500", "reference": "OTHER"}, wanted)
    assert not already_done({"status": "pending"}, wanted)
    assert already_done({"status": "cancelled"}, update(DoshiiStatus.CANCELLED))


def test_why_not_tells_the_operator_what_to_do() -> None:
    paid = update(DoshiiStatus.ACTIVATED, amount_cents=2500)
    assert "refund it by hand" in why_not({"status": "cancelled"}, paid)
    ended = update(DoshiiStatus.CANCELLED, cancelled_reason="voucher EXPIRED")
    assert "deactivate the card by hand" in why_not({"status": "activated"}, ended)


def test_doshii_bodies_follow_the_documented_shape() -> None:
    activation = update(
        DoshiiStatus.ACTIVATED,
        amount_cents=2500,
        expiry_date=datetime(2019, 9, 27, 4, 58, 38, 485000, tzinfo=UTC),
        reference="1af533",
    )
    assert activation.body() == {
        "event": "card_activate",
        "status": "activated",
        "amount": 2500,
        "expiryDate": "2019-09-27T04:58:38.485000Z",
        "reference": "1af533",
    }
    cancel = update(DoshiiStatus.CANCELLED, cancelled_reason="Gift card is not valid")
    assert cancel.body() == {
        "event": "card_activate",
        "status": "cancelled",
        "cancelledReason": "Gift card is not valid",
    }
    with pytest.raises(PermanentError):
        update(DoshiiStatus.ACTIVATED).body()


def test_mismatch_compares_value_in_cents_with_the_key() -> None:
    parsed = Voucher.model_validate_json(encode(voucher(value=110)))
    claims = KeyClaims(location_id="l", request_id="r", amount_cents=11000)
    assert mismatch(parsed, claims, 100) is None
    other = claims.model_copy(update={"amount_cents": 5000})
    problem = mismatch(parsed, other, 100)
    assert problem is not None
    assert "11000" in problem
    assert "5000" in problem
    assert parsed.value == Decimal(110)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("7", 7.0), ("-3", 0.0), ("soon", None), ("1.5", 1.5)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_s(header) == expected


def test_retry_after_http_date() -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    seconds = retry_after_s(later.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None
    assert 25 <= seconds <= 31


def test_doshii_token_is_fresh_and_signed_for_this_client() -> None:
    import time

    import jwt

    from shared.partners import Doshii

    secret = "doshii-secret-0123456789abcdef-0123"
    client = Doshii(None, "http://doshii.invalid", "app-1", secret)  # type: ignore[arg-type]
    headers = client._headers("aH43yx2")
    token = headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["clientId"] == "app-1"
    assert abs(claims["timestamp"] - time.time()) <= 2
    assert headers["doshii-location-id"] == "aH43yx2"
    # A token from an earlier second is never reused.
    client._token_second -= 5
    client._token_value = "stale"
    renewed = client._token()
    assert renewed != "stale"
    assert abs(jwt.decode(renewed, secret, algorithms=["HS256"])["timestamp"] - time.time()) <= 2
