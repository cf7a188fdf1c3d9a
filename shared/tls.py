"""TLS to the broker: one SSLContext for every amqps:// connection, and what a refusal means.

Hostname verification is always on and there is no setting to turn it off: a managed broker's
certificate names its host, and a certificate that does not verify is a stop, never a reason to
fall back to plain AMQP.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import SettingsError

__all__ = ["certificate_problem", "client_context", "needs_tls"]


def needs_tls(urls: list[str]) -> bool:
    """Whether any of the broker URLs is amqps://."""
    return any(urlsplit(url).scheme == "amqps" for url in urls)


def client_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name.

    `ca_file` None trusts the system store. A client certificate is optional (its key may be
    in `cert_file` itself). Files that cannot be loaded raise SettingsError naming the variable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise SettingsError(
            f"BRIDGE_AMQP_CA_FILE: cannot load {ca_file} as a PEM CA bundle: {error}"
        ) from error
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            raise SettingsError(
                f"BRIDGE_AMQP_CERT_FILE / BRIDGE_AMQP_KEY_FILE: cannot load the client "
                f"certificate {cert_file} with its key: {error}"
            ) from error
    # create_default_context already does both; set them so that no later change can drop them.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def certificate_problem(error: BaseException) -> str | None:
    """Why the broker's certificate was refused, if that is what `error` (or its cause) is."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or current)
        current = current.__cause__ or current.__context__
    return None
