"""TLS to the broker: one SSLContext for every amqps:// connection, and what a refusal means.

Hostname verification is always on and there is no setting to turn it off: a managed broker's
certificate names its host, and a certificate that does not verify is a stop, never a reason to
fall back to plain AMQP.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from shared.errors import BrokerCertificateError, SettingsError

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


# What to check when no node's certificate could be verified.
CERTIFICATE_HINT = (
    " (BRIDGE_AMQP_CA_FILE names the CA to trust; the host in BRIDGE_AMQP_URL must"
    " be one the certificate names)"
)

_T = TypeVar("_T")


class NoNodeAnswered(Exception):
    """No node answered; `failures` says why for each, the cause is the last one's error."""

    def __init__(self, failures: Sequence[str]) -> None:
        super().__init__("no broker node answered: " + "; ".join(failures))
        self.failures = list(failures)


async def first_answering(
    addresses: Sequence[str],
    start: int,
    attempt: Callable[[int], Awaitable[_T]],
    describe: Callable[[BaseException], str],
) -> tuple[_T, int]:
    """`attempt(index)` for node `start`, then the next ones in turn, until one answers.

    Returns its result and the index of the node that answered. Raises
    BrokerCertificateError when some node's certificate was refused and none answered, else
    NoNodeAnswered (from the last node's error).
    """
    failures: list[str] = []
    refused: list[str] = []
    last: Exception | None = None
    for step in range(len(addresses)):
        index = (start + step) % len(addresses)
        try:
            return await attempt(index), index
        except Exception as error:
            # aiormq raises more than AMQP and socket errors (StopAsyncIteration on a reset
            # mid-handshake): whatever it is, this node did not answer.
            last = error
            problem = certificate_problem(error)
            if problem is not None:
                refused.append(f"broker {addresses[index]}: TLS certificate refused: {problem}")
            failures.append(f"{addresses[index]}: {describe(error)}")
    if refused:
        raise BrokerCertificateError("; ".join(refused) + CERTIFICATE_HINT) from last
    raise NoNodeAnswered(failures) from last
