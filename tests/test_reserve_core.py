"""The pure core of the till's side: amounts, session claims, refusals, card refs, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import SettingsError
from shared.intake import CardActivate, CardRefHasher, IntakeRequest, intake_request
from shared.reserve import (
    JackpotRefusal,
    RefusalKind,
    cents_to_units,
    classify_refusal,
    json_number,
    money_text,
    refusal_reason,
    reserve_body,
    reserve_route,
    session_claims,
    token_from,
    unavailable_reason,
)
from shared.settings import JackpotOffer, ReserveBy, Settings, check_intake, parse_webhook_auth

SIGNATURE = "jackpot-api-signature-0123456789abcdef"
BASE = {
    "key_secrets": "a-secret-of-enough-length",
    "jackpot_api_key": "k",
    "doshii_client_id": "c",
    "doshii_client_secret": "s",
}
SESSION = {"jackpot_api_signature": SIGNATURE, "jackpot_client_id": "c"}


def make(**values: str) -> Settings:
    """Settings from these values only (no environment), as the process would build them."""
    return Settings.model_validate({**BASE, **values})


def test_money_is_shown_with_two_decimals() -> None:
    assert money_text(2500) == "25.00"
    assert money_text(5) == "0.05"
    assert money_text(123456) == "1234.56"


def test_reasons_the_till_shows() -> None:
    assert refusal_reason(RefusalKind.OUT_OF_STOCK, 2500) == (
        "No voucher available for 25.00: out of stock"
    )
    assert refusal_reason(RefusalKind.NO_SUCH_OFFER, 1000).endswith("offer not found")
    assert refusal_reason(RefusalKind.AMOUNT_NOT_ALLOWED, 1).startswith("No voucher available")
    assert unavailable_reason(2500) == "No voucher available for 25.00: supplier unavailable"


@given(st.integers(min_value=1, max_value=10**11), st.sampled_from([1, 10, 100, 1000]))
def test_cents_to_units_is_exact_for_decimal_factors(cents: int, factor: int) -> None:
    units = cents_to_units(cents, factor)
    assert units * factor == cents
    assert Decimal(str(json_number(units))) * factor == cents


def test_cents_to_units() -> None:
    assert cents_to_units(2500, 100) == Decimal(25)
    assert cents_to_units(2550, 100) == Decimal("25.5")
    assert json_number(cents_to_units(2500, 100)) == 25
    assert json_number(cents_to_units(2550, 100)) == 25.5
    assert isinstance(json_number(Decimal(25)), int)
    with pytest.raises(ValueError, match="whole number"):
        cents_to_units(100, 3)
    with pytest.raises(ValueError, match="not an amount"):
        cents_to_units(0, 100)


def test_session_claims() -> None:
    claims = session_claims(
        amount_units=Decimal(25),
        notification_key="v1.k.m",
        issued_at_s=1_700_000_000,
        force_manual_confirm=True,
    )
    assert claims == {
        "amount": 25,
        "iat": 1_700_000_000,
        "notificationKey": "v1.k.m",
        "forceManualConfirm": True,
    }
    claims = session_claims(
        amount_units=Decimal("25.5"),
        notification_key="k",
        issued_at_s=1,
        force_manual_confirm=False,
    )
    assert "forceManualConfirm" not in claims
    assert claims["amount"] == 25.5


def test_reserve_route_and_body() -> None:
    assert reserve_route("s1", "o1", ReserveBy.VALUE) == (
        "/v2/stores/s1/offers/o1/reserve-voucher-by-value"
    )
    assert reserve_route("s1", "o1", ReserveBy.PRICE).endswith("/reserve-voucher-by-price")
    assert reserve_body(ReserveBy.VALUE, Decimal(25)) == {"value": 25}
    assert reserve_body(ReserveBy.PRICE, Decimal("25.5")) == {"price": 25.5}


@pytest.mark.parametrize(
    ("answer", "token"),
    [
        ({"access_token": "a", "token_type": "Bearer"}, "a"),
        ({"accessToken": "b"}, "b"),
        ({"token": "c"}, "c"),
        ({"access_token": "", "token": "d"}, "d"),
        ({"access_token": 5}, None),
        ({}, None),
        ("a-bare-string", None),
        (None, None),
    ],
)
def test_the_token_is_read_from_any_documented_shape(answer: object, token: str | None) -> None:
    assert token_from(answer) == token


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (409, '{"code": "OUT_OF_STOCK", "message": "Offer o1 is out of stock"}', "out_of_stock"),
        (400, '{"message": "Sold out"}', "out_of_stock"),
        (404, '{"code": "OFFER_NOT_FOUND"}', "no_such_offer"),
        (404, "", "no_such_offer"),
        (400, '{"code": "STORE_NOT_FOUND"}', "no_such_offer"),
        (
            400,
            '{"code": "AMOUNT_NOT_ALLOWED", "message": "7 not offered"}',
            "amount_not_allowed",
        ),
        (422, '{"message": "invalid price"}', "amount_not_allowed"),
        (403, '{"message": "forbidden"}', "refused"),
        (418, "teapot", "refused"),
    ],
)
def test_refusals_are_classified(status: int, body: str, kind: str) -> None:
    assert classify_refusal(status, body) == kind


def test_a_refusal_carries_the_till_reason() -> None:
    refusal = JackpotRefusal(RefusalKind.OUT_OF_STOCK, 2500, 409, "OUT_OF_STOCK")
    assert refusal.reason == "No voucher available for 25.00: out of stock"
    assert "409" in str(refusal)


def test_card_refs_are_keyed_hashes_that_need_the_secret() -> None:
    first = CardRefHasher("secret-one-0123456789")
    assert first("1234-5678-9012") == first("1234-5678-9012")
    assert first("1234-5678-9012") != first("1234-5678-9013")
    assert first("1234-5678-9012") != CardRefHasher("secret-two-0123456789")("1234-5678-9012")
    assert "1234" not in first("1234-5678-9012")[3:]
    assert first("x").startswith("v1.")


def test_the_intake_message_keeps_no_credential() -> None:
    sale = CardActivate.model_validate(
        {
            "id": 1354,
            "locationId": "aH43yx2",
            "status": "pending",
            "requestData": {
                "amount": "2500",
                "cardRef": "1234-5678-9012",
                "cardAuthorisationKey": "4321",
                "cardProviderAuthPassword": "hunter2",
            },
        }
    )
    received = datetime(2026, 1, 1, tzinfo=UTC)
    intake = intake_request(sale, CardRefHasher("secret-one-0123456789"), received)
    raw = intake.model_dump_json()
    for secret in ("hunter2", "4321", "1234-5678-9012"):
        assert secret not in raw
    assert intake.request_id == "1354"
    assert intake.card_ref_last4 == "9012"
    assert intake.deadline(120) == received + timedelta(seconds=120)
    assert IntakeRequest.model_validate_json(raw) == intake


def test_webhook_auth_pairs() -> None:
    pairs = parse_webhook_auth("key:token-0123456789abcdef, old:tok:en-with-colon-0123")
    assert [p.get_secret_value() for p in pairs] == [
        "key:token-0123456789abcdef",
        "old:tok:en-with-colon-0123",
    ]
    for bad in ("no-colon-0123456789", ":token-0123456789abcdef", "key:", "key:short"):
        with pytest.raises(ValueError, match=r"key:token|characters"):
            parse_webhook_auth(bad)


def test_offers_per_location_and_the_default() -> None:
    settings = make(
        jackpot_offers="loc1=s1:o1, loc2=s2:o2",
        jackpot_store_id="s0",
        jackpot_offer_id="o0",
    )
    assert settings.offer_for("loc1") == JackpotOffer("s1", "o1")
    assert settings.offer_for("loc2") == JackpotOffer("s2", "o2")
    assert settings.offer_for("elsewhere") == JackpotOffer("s0", "o0")
    assert make(jackpot_offers="loc1=s1:o1").offer_for("elsewhere") is None


@pytest.mark.parametrize("offers", ["loc1", "loc1=s1", "=s1:o1", "loc1=s1:o1,loc1=s2:o2"])
def test_bad_offer_maps_are_refused(offers: str) -> None:
    with pytest.raises(ValueError, match="jackpot_offers"):
        make(jackpot_offers=offers)


def test_only_the_intake_needs_the_reservation_settings() -> None:
    settings = make()
    with pytest.raises(SettingsError) as raised:
        check_intake(settings)
    for variable in (
        "BRIDGE_JACKPOT_API_SIGNATURE",
        "BRIDGE_JACKPOT_CLIENT_ID",
        "BRIDGE_JACKPOT_STORE_ID",
    ):
        assert variable in str(raised.value)
    with pytest.raises(SettingsError, match="set both or neither"):
        check_intake(make(**SESSION, jackpot_store_id="s"))
    check_intake(
        make(
            jackpot_api_signature=SIGNATURE,
            jackpot_client_id="c",
            jackpot_store_id="s",
            jackpot_offer_id="o",
        )
    )
    check_intake(make(**SESSION, jackpot_offers="l=s:o"))


def test_the_session_jwt_is_signed_with_the_api_signature() -> None:
    from shared.partners import JackpotSessions
    from shared.settings import ConfirmMode

    client = JackpotSessions(
        None,  # type: ignore[arg-type]
        "http://127.0.0.1:9",
        client_id="c",
        api_signature=SIGNATURE,
        confirm=ConfirmMode.API,
    )
    token = client.assertion(amount_cents=2500, notification_key="v1.x.y", issued_at_s=100)
    claims = jwt.decode(token, SIGNATURE, algorithms=["HS256"], options={"verify_iat": False})
    assert claims == {
        "amount": 25,
        "iat": 100,
        "notificationKey": "v1.x.y",
        "forceManualConfirm": True,
    }
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-signature-0123456789abcdef", algorithms=["HS256"])
    with pytest.raises(JackpotRefusal) as refused:
        JackpotSessions(
            None,  # type: ignore[arg-type]
            "http://127.0.0.1:9",
            client_id="c",
            api_signature=SIGNATURE,
            value_to_cents=3,
        ).assertion(amount_cents=100, notification_key="k")
    assert refused.value.kind == RefusalKind.AMOUNT_NOT_ALLOWED
    assert refused.value.reason == "No voucher available for 1.00: amount not allowed"


def test_the_new_settings_survive_the_trip_through_a_child_processs_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.settings import load_settings
    from tests.support.pipeline import settings_env

    settings = make(
        doshii_webhook_auth="k:token-0123456789abcdef,old:token-old-0123456789",
        jackpot_offers="loc1=s1:o1,loc2=s2:o2",
        jackpot_api_signature=SIGNATURE,
        jackpot_reserve_by="price",
        intake_deadline_s="30",
    )
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    again = load_settings()
    assert again.doshii_webhook_auth == settings.doshii_webhook_auth
    assert again.jackpot_offers == settings.jackpot_offers
    assert again.jackpot_api_signature == settings.jackpot_api_signature
    assert again.jackpot_reserve_by == ReserveBy.PRICE
    assert again.intake_deadline_s == 30
