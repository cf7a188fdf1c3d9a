"""Settings fail at start naming the variable; the voucher model keeps what Jackpot sends."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import PermanentError, SettingsError
from shared.models import Route, Voucher, VoucherState, value_to_cents
from shared.settings import PdfOrigin, load_settings
from tests.support.vouchers import encode, voucher

REQUIRED = {
    "BRIDGE_KEY_SECRETS": "a-secret-of-enough-length",
    "BRIDGE_JACKPOT_API_KEY": "k",
    "BRIDGE_DOSHII_CLIENT_ID": "c",
    "BRIDGE_DOSHII_CLIENT_SECRET": "s",
}


def test_missing_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in REQUIRED:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    for name in REQUIRED:
        assert f"{name}: is missing" in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BRIDGE_HTTP_PORT", "eighty"),
        ("BRIDGE_AMQP_URL", "http://broker"),
        ("BRIDGE_JACKPOT_CONFIRM", "maybe"),
        ("BRIDGE_PDF_HOSTS", "http://no-port.example"),
        ("BRIDGE_KEY_SECRETS", "short"),
        ("BRIDGE_NAMESPACE", "bad name!"),
        ("BRIDGE_VALUE_TO_CENTS", "0"),
        ("BRIDGE_DOSHII_WEBHOOK_AUTH", "key-without-token"),
        ("BRIDGE_DOSHII_WEBHOOK_AUTH", "key:short"),
        ("BRIDGE_JACKPOT_RESERVE_BY", "budget"),
        ("BRIDGE_JACKPOT_OFFERS", "loc1=store-without-offer"),
        ("BRIDGE_INTAKE_DEADLINE_S", "0"),
    ],
)
def test_bad_value_is_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    for name, good in REQUIRED.items():
        monkeypatch.setenv(name, good)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_process_exits_with_the_message() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "ingress"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "BRIDGE_KEY_SECRETS: is missing" in result.stderr


def test_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, good in REQUIRED.items():
        monkeypatch.setenv(name, good)
    monkeypatch.setenv("BRIDGE_KEY_SECRETS", "first-secret-0123456789, second-secret-0123456789")
    monkeypatch.setenv(
        "BRIDGE_PDF_HOSTS", "cdn.example, https://s3.example:8443,http://127.0.0.1:81"
    )
    settings = load_settings()
    assert [s.get_secret_value() for s in settings.key_secrets] == [
        "first-secret-0123456789",
        "second-secret-0123456789",
    ]
    assert settings.pdf_hosts == [
        PdfOrigin(("https", "cdn.example", 443)),
        PdfOrigin(("https", "s3.example", 8443)),
        PdfOrigin(("http", "127.0.0.1", 81)),
    ]
    assert "first-secret" not in repr(settings)


def test_documented_example_parses_with_every_field() -> None:
    body = voucher("READY")
    parsed = Voucher.model_validate_json(encode(body))
    assert parsed.state is VoucherState.READY
    assert parsed.value == Decimal(110)
    assert parsed.validityDate.year == 2018
    assert parsed.signedUrl == body["signedUrl"]
    assert parsed.sendDate is not None
    assert parsed.route is Route.READY


def test_extra_fields_are_kept_and_unknown_state_accepted() -> None:
    parsed = Voucher.model_validate_json(encode(voucher("ON_HOLD", giftMessage="hi")))
    assert parsed.state == "ON_HOLD"
    assert not isinstance(parsed.state, VoucherState)
    assert parsed.route is Route.LIFECYCLE
    assert parsed.model_extra == {"giftMessage": "hi"}


@pytest.mark.parametrize("state", list(VoucherState))
def test_every_known_state_parses_as_enum(state: VoucherState) -> None:
    assert Voucher.model_validate_json(encode(voucher(str(state)))).state is state


def test_naive_dates_and_huge_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        Voucher.model_validate_json(encode(voucher(validityDate="2018-01-31T00:00:00")))
    with pytest.raises(ValidationError):
        Voucher.model_validate_json(b'{"value": 1e400}' + encode(voucher())[1:])


@given(st.decimals(min_value=0, max_value=10**6, places=2))
def test_value_to_cents_whole_cents(value: Decimal) -> None:
    assert value_to_cents(value, 100) == int(value * 100)


def test_fraction_of_a_cent_is_permanent() -> None:
    with pytest.raises(PermanentError):
        value_to_cents(Decimal("1.005"), 100)


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5))
def test_random_objects_never_crash_the_parser(extra: dict[str, str]) -> None:
    with contextlib.suppress(ValidationError):
        Voucher.model_validate_json(json.dumps(extra))


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    from shared.settings import Settings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`BRIDGE_{name.upper()}`" in readme, name


def test_pdfs_worker_refuses_to_start_without_pdf_hosts() -> None:
    env = {"PATH": "/usr/bin:/bin", **REQUIRED}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "worker", "pdfs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "BRIDGE_PDF_HOSTS: is empty" in result.stderr


@pytest.mark.parametrize("state", ["", "café", "A B", "<script>", "X" * 65, "NEW\n"])
def test_unknown_states_must_look_like_states(state: str) -> None:
    with pytest.raises(ValidationError):
        Voucher.model_validate_json(encode(voucher(state)))
