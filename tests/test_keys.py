"""notificationKeys: what verifies, what does not, and rotation."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import InvalidKey
from shared.keys import KeyRing
from shared.models import KeyClaims

SECRET = "current-secret-0123456789"
OLD = "previous-secret-0123456789"
OTHER = "somebody-elses-secret-0123"

ids = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=64
)
claims_strategy = st.builds(
    KeyClaims,
    location_id=ids,
    request_id=ids,
    amount_cents=st.integers(min_value=0, max_value=10**11),
)


@given(claims_strategy)
def test_minted_key_verifies_to_its_claims(claims: KeyClaims) -> None:
    ring = KeyRing([SECRET])
    assert ring.verify(ring.mint(claims)) == claims


@given(claims_strategy)
def test_key_is_url_safe(claims: KeyClaims) -> None:
    key = KeyRing([SECRET]).mint(claims)
    assert all(c.isalnum() or c in "-_." for c in key)


@given(claims_strategy)
def test_wrong_secret_is_refused(claims: KeyClaims) -> None:
    key = KeyRing([OTHER]).mint(claims)
    with pytest.raises(InvalidKey):
        KeyRing([SECRET, OLD]).verify(key)


@given(claims_strategy)
def test_rotated_secret_still_verifies_and_new_keys_use_the_first(claims: KeyClaims) -> None:
    before = KeyRing([OLD]).mint(claims)
    rotated = KeyRing([SECRET, OLD])
    assert rotated.verify(before) == claims
    after = rotated.mint(claims)
    assert KeyRing([SECRET]).verify(after) == claims
    with pytest.raises(InvalidKey):
        KeyRing([OLD]).verify(after)


@given(claims_strategy, st.data())
def test_tampered_claims_are_refused(claims: KeyClaims, data: st.DataObject) -> None:
    ring = KeyRing([SECRET])
    version, payload, mac = ring.mint(claims).split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    field = data.draw(st.sampled_from(["l", "r", "a"]))
    decoded[field] = decoded[field] + 1 if field == "a" else decoded[field] + "x"
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidKey):
        ring.verify(f"{version}.{forged}.{mac}")


@given(claims_strategy, st.integers(min_value=0, max_value=21), st.characters())
def test_tampered_mac_is_refused(claims: KeyClaims, position: int, char: str) -> None:
    ring = KeyRing([SECRET])
    version, payload, mac = ring.mint(claims).split(".")
    if mac[position] == char:
        char = "A" if char != "A" else "B"
    forged_mac = mac[:position] + char + mac[position + 1 :]
    with pytest.raises(InvalidKey):
        ring.verify(f"{version}.{payload}.{forged_mac}")


@given(claims_strategy, st.integers(min_value=1, max_value=30))
def test_truncated_key_is_refused(claims: KeyClaims, cut: int) -> None:
    ring = KeyRing([SECRET])
    key = ring.mint(claims)
    with pytest.raises(InvalidKey):
        ring.verify(key[:-cut])


@given(st.text(max_size=600))
def test_arbitrary_text_never_verifies_and_never_crashes(text: str) -> None:
    with pytest.raises(InvalidKey):
        KeyRing([SECRET]).verify(text)


def test_signed_garbage_claims_are_refused() -> None:
    # A MAC over bytes that are not claims (as if a secret leaked) still yields no claims.
    ring = KeyRing([SECRET])
    payload = base64.urlsafe_b64encode(b'{"l":""}').rstrip(b"=").decode()
    mac = ring._mac(0, payload.encode())
    with pytest.raises(InvalidKey, match="no valid claims"):
        ring.verify(f"v1.{payload}.{mac}")


def test_missing_key_is_named() -> None:
    with pytest.raises(InvalidKey, match="missing"):
        KeyRing([SECRET]).verify(None)


def test_a_remembered_key_still_needs_its_mac() -> None:
    ring = KeyRing([SECRET])
    key = ring.mint(KeyClaims(location_id="l", request_id="r", amount_cents=1))
    assert ring.verify(key).request_id == "r"
    version, payload, _ = key.split(".")
    with pytest.raises(InvalidKey):
        ring.verify(f"{version}.{payload}.{'A' * 22}")


@given(claims_strategy, st.integers(min_value=0, max_value=21))
def test_a_verified_key_does_not_let_its_tampered_twins_through(
    claims: KeyClaims, position: int
) -> None:
    ring = KeyRing([SECRET])
    key = ring.mint(claims)
    assert ring.verify(key) == claims
    assert ring.verify(key) == claims  # the second time from the ring's memory of verified keys
    version, payload, mac = key.split(".")
    char = "A" if mac[position] != "A" else "B"
    for forged in (
        f"{version}.{payload}.{mac[:position]}{char}{mac[position + 1 :]}",
        f"{version}.{payload}x.{mac}",
        f"{key}.",
    ):
        with pytest.raises(InvalidKey):
            ring.verify(forged)
    with pytest.raises(InvalidKey):
        KeyRing([OTHER]).verify(key)
