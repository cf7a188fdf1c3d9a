"""The project's errors, named for what the caller must do."""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error voucher-bridge raises on purpose."""


class SettingsError(BridgeError):
    """A setting is missing or bad; the message names the variable."""


class TransientError(BridgeError):
    """Worth retrying later: timeouts, lost connections, 5xx, 429."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(BridgeError):
    """Retrying cannot help: dead-letter the message with this reason, never requeue."""


class BrokerUnavailable(TransientError):
    """The broker did not take a message: not connected, nacked, unroutable or unconfirmed."""


class BrokerCertificateError(BridgeError):
    """A broker's TLS certificate did not verify: retrying cannot help, the settings must change."""


class InvalidKey(BridgeError):
    """A notificationKey that is missing, malformed or not signed by any of our secrets."""
