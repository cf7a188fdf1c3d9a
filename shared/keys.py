"""notificationKeys: the signed tokens we mint when reserving and Jackpot echoes back.

    v1.<base64url(claims json)>.<base64url(HMAC-SHA256(secret, "v1." + claims))[:22]>

The first secret signs; every secret verifies, so secrets can be rotated without losing the
notifications of vouchers reserved under the old one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence

from pydantic import SecretStr, ValidationError

from shared.errors import InvalidKey
from shared.models import KeyClaims

VERSION = "v1"
_PREFIX = b"v1."
# 22 base64url characters carry 132 bits of the MAC: far beyond guessing, and short in a URL.
MAC_CHARS = 22
# Claims are three fields of at most 64 characters each (JSON-escaped); nothing longer is ours.
MAX_KEY_CHARS = 2048
# Enough for the vouchers in flight at once; past it the cache simply starts over.
VERIFIED_CACHE_SIZE = 4096


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyRing:
    """Mints and verifies keys. HMAC state is precomputed per secret; each use copies it."""

    def __init__(self, secrets: Sequence[SecretStr | str]) -> None:
        if not secrets:
            raise ValueError("a key ring needs at least one secret")
        raw = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        self._macs = [hmac.new(s.encode(), _PREFIX, hashlib.sha256) for s in raw]
        # Keys that already verified, exactly as given: every voucher's RESERVED and READY (and
        # Jackpot's retries) carry the same key, and the secrets of a ring never change. Only a
        # byte-identical key hits, so a tampered one is always checked in full.
        self._verified: dict[str, KeyClaims] = {}

    def _mac(self, index: int, claims_b64: bytes) -> str:
        mac = self._macs[index].copy()
        mac.update(claims_b64)
        return _b64encode(mac.digest())[:MAC_CHARS]

    def mint(self, claims: KeyClaims) -> str:
        payload = json.dumps(
            claims.model_dump(by_alias=True), separators=(",", ":"), sort_keys=True
        ).encode()
        claims_b64 = _b64encode(payload)
        return f"{VERSION}.{claims_b64}.{self._mac(0, claims_b64.encode())}"

    def verify(self, key: str | None) -> KeyClaims:
        """Return the claims of a key signed by any of our secrets, or raise InvalidKey."""
        if not key:
            raise InvalidKey("notificationKey is missing")
        claims = self._verified.get(key)
        if claims is not None:
            return claims
        if len(key) > MAX_KEY_CHARS:
            raise InvalidKey("notificationKey is too long")
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise InvalidKey("notificationKey is not a v1 key")
        claims_b64, given = parts[1], parts[2]
        try:
            claims_bytes = claims_b64.encode("ascii")
            given_bytes = given.encode("ascii")
        except UnicodeEncodeError as error:
            raise InvalidKey("notificationKey is not a v1 key") from error
        # Check every secret without stopping early, so timing says nothing about which matched.
        matched = False
        for index in range(len(self._macs)):
            matched |= hmac.compare_digest(self._mac(index, claims_bytes).encode(), given_bytes)
        if not matched:
            raise InvalidKey("notificationKey is not signed by any of our secrets")
        try:
            claims = KeyClaims.model_validate_json(_b64decode(claims_b64))
        except (ValidationError, binascii.Error, ValueError) as error:
            raise InvalidKey("notificationKey carries no valid claims") from error
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[key] = claims
        return claims
