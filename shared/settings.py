"""Every setting of voucher-bridge: one pydantic-settings class, read from `BRIDGE_*` variables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import Field, FilePath, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import SettingsError
from shared.tls import client_context, needs_tls

ENV_PREFIX = "BRIDGE_"


class ConfirmMode(StrEnum):
    """How a reservation is agreed with Jackpot."""

    API = "api"  # PUT /v2/voucher/{id}/confirm from the reservations worker
    NOTIFICATION = "notification"  # the ingress's 200 to the RESERVED call is the agreement


class ReserveBy(StrEnum):
    """Which Jackpot reserve route the intake uses: the till's amount as value, or as budget."""

    VALUE = "value"  # .../reserve-voucher-by-value {"value": N}: the voucher is worth N
    PRICE = "price"  # .../reserve-voucher-by-price {"price": N}: the voucher costs N


# A webhook token is a credential we choose when registering the webhook; as long as a key secret.
MIN_WEBHOOK_TOKEN_CHARS = 16


class JackpotOffer(NamedTuple):
    """Where a voucher is reserved: a Jackpot store and one of its offers."""

    store_id: str
    offer_id: str


def parse_webhook_auth(text: str) -> list[SecretStr]:
    """`key:token[,key:token...]`, the Basic credentials Doshii's webhooks may carry."""
    pairs = []
    for part in _split_commas(text):
        key, colon, token = part.partition(":")
        if not colon or not key or not token:
            raise ValueError(
                "each entry must be `key:token` (authenticationKey:authenticationToken)"
            )
        if len(token) < MIN_WEBHOOK_TOKEN_CHARS:
            raise ValueError(f"every token must be at least {MIN_WEBHOOK_TOKEN_CHARS} characters")
        pairs.append(SecretStr(part))
    return pairs


def _parse_offers(text: str) -> dict[str, JackpotOffer]:
    offers: dict[str, JackpotOffer] = {}
    for part in _split_commas(text):
        location, equals, target = part.partition("=")
        store, colon, offer = target.partition(":")
        if not equals or not colon or not location or not store or not offer:
            raise ValueError(f"{part!r} is not `location=store:offer`")
        if location in offers:
            raise ValueError(f"location {location!r} is given twice")
        offers[location] = JackpotOffer(store, offer)
    return offers


class PdfOrigin(tuple[str, str, int]):
    """An origin allowed to serve voucher PDFs: (scheme, host, port)."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> PdfOrigin:
        text = text.strip()
        if "://" not in text:
            text = f"https://{text}"
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{text!r} is not `host`, `https://host[:port]` or `http://host:port`")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{text!r} must be an origin, without a path")
        if parts.scheme == "http" and parts.port is None:
            raise ValueError(f"{text!r}: plain http is allowed only for an exact host:port")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls((parts.scheme, parts.hostname.lower(), port))

    @property
    def scheme(self) -> str:
        return self[0]

    @property
    def host(self) -> str:
        return self[1]

    @property
    def port(self) -> int:
        return self[2]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """The process's configuration. Build it once in `main()` and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    # Broker: one URL, or a comma-separated list of a cluster's nodes (tried in order).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # TLS for amqps:// URLs: the CA bundle to trust (None: the system store), and an optional
    # client certificate (its key in amqp_key_file, or in the same file). Hostnames are always
    # checked.
    amqp_ca_file: FilePath | None = None
    amqp_cert_file: FilePath | None = None
    amqp_key_file: FilePath | None = None
    amqp_connect_timeout_s: float = Field(5.0, gt=0, le=120)
    # Replicas per quorum queue; None: the broker's default (every node of a cluster up to 5).
    quorum_initial_group_size: int | None = Field(None, ge=1, le=99)
    namespace: str = Field("bridge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    # Notification keys: the first secret signs, all of them verify.
    key_secrets: Annotated[list[SecretStr], NoDecode] = Field(min_length=1)

    # Ingress HTTP
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    publish_timeout_s: float = Field(5.0, gt=0, le=60)

    # Spool used while the broker cannot take notifications
    spool_dir: Path = Path("var/spool")
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    # How often an ingress looks for spool folders whose process is gone, to drain them itself.
    spool_adopt_interval_s: float = Field(10.0, gt=0, le=3600)

    # Partners
    jackpot_api_url: str = "https://api.jackpot-io.com"
    jackpot_api_key: SecretStr
    jackpot_confirm: ConfirmMode = ConfirmMode.API
    doshii_api_url: str = "https://sandbox.doshii.co/partner/v3"
    doshii_client_id: str = Field(min_length=1)
    doshii_client_secret: SecretStr
    partner_timeout_s: float = Field(10.0, gt=0, le=120)

    # The till's side (issue 10). The ingress serves Doshii's webhook only when auth is set.
    doshii_webhook_auth: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Reserving at Jackpot: only the intake worker needs these (`check_intake`).
    jackpot_api_signature: SecretStr | None = None
    jackpot_client_id: str | None = Field(None, min_length=1)
    jackpot_reserve_by: ReserveBy = ReserveBy.VALUE
    jackpot_store_id: str | None = Field(None, min_length=1)
    jackpot_offer_id: str | None = Field(None, min_length=1)
    jackpot_offers: Annotated[dict[str, JackpotOffer], NoDecode] = Field(default_factory=dict)
    # Doshii retries its webhook for long; the till's customer waits two minutes at most.
    intake_deadline_s: float = Field(120.0, gt=0, le=3600)

    # Vouchers and PDFs
    value_to_cents: int = Field(100, gt=0)
    # Where Jackpot's PDF links point is not documented: no default, the pdfs worker needs it.
    pdf_hosts: Annotated[list[PdfOrigin], NoDecode] = Field(default_factory=list)
    pdf_dir: Path = Path("var/pdfs")
    pdf_max_bytes: int = Field(10 * 1024 * 1024, gt=0)

    # Workers
    prefetch: int = Field(32, ge=1, le=10_000)
    concurrency: int = Field(16, ge=1, le=10_000)
    retry_tiers_s: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [10, 60, 300, 1800, 7200], min_length=1
    )
    quick_retries: int = Field(3, ge=1, le=10)
    delivery_limit: int = Field(20, ge=1)
    worker_http_port: int = Field(9100, ge=0, le=65535)
    drain_timeout_s: float = Field(30.0, gt=0)

    # Ledger (PostgreSQL): the journey of every voucher, and the sweeper that reconciles it
    ledger: bool = True  # False: no journey steps, and no ledger or sweeper in `all`
    # How long a stage gathers journey steps into one journal message; acks wait that long.
    journal_linger_s: float = Field(0.05, ge=0, le=1)
    database_url: SecretStr = SecretStr("postgresql://bridge:bridge@127.0.0.1:5432/bridge")
    database_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    sweep_interval_s: float = Field(60.0, gt=0)
    sweep_ready_after_s: float = Field(15 * 60.0, gt=0)
    sweep_give_up_s: float = Field(24 * 3600.0, gt=0)
    sweep_audit_every_s: float = Field(3600.0, gt=0)
    sweep_audit_window_s: float = Field(7 * 24 * 3600.0, gt=0)

    # Logs
    log_level: str = Field("info", pattern=r"(?i)^(debug|info|warning|error)$")
    log_json: bool | None = None  # None: JSON unless stderr is a terminal

    @field_validator("key_secrets", mode="before")
    @classmethod
    def _parse_secrets(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, list) and any(len(str(s)) < 16 for s in value):
            raise ValueError("every secret must be at least 16 characters")
        return value

    @field_validator("pdf_hosts", mode="before")
    @classmethod
    def _parse_pdf_hosts(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, list):
            return [v if isinstance(v, PdfOrigin) else PdfOrigin.parse(str(v)) for v in value]
        return value

    @field_validator("doshii_webhook_auth", mode="before")
    @classmethod
    def _parse_webhook_auth(cls, value: Any) -> Any:
        return parse_webhook_auth(value) if isinstance(value, str) else value

    @field_validator("jackpot_offers", mode="before")
    @classmethod
    def _parse_jackpot_offers(cls, value: Any) -> Any:
        return _parse_offers(value) if isinstance(value, str) else value

    def offer_for(self, location_id: str) -> JackpotOffer | None:
        """The store and offer to reserve at for a Doshii location: its own, else the default."""
        offer = self.jackpot_offers.get(location_id)
        if offer is not None:
            return offer
        if self.jackpot_store_id and self.jackpot_offer_id:
            return JackpotOffer(self.jackpot_store_id, self.jackpot_offer_id)
        return None

    @field_validator("retry_tiers_s", mode="before")
    @classmethod
    def _parse_tiers(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("jackpot_api_url", "doshii_api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError("must be a postgresql://user:password@host:port/database URL")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp(cls, value: SecretStr) -> SecretStr:
        urls = _split_commas(value.get_secret_value())
        if not urls:
            raise ValueError("must be an amqp:// or amqps:// URL, or a comma-separated list")
        for index, url in enumerate(urls, start=1):
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as error:
                raise ValueError(f"URL {index} of the list is not a URL: {error}") from None
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(f"URL {index} of the list is not an amqp:// or amqps:// URL")
        return value

    @field_validator("amqp_key_file")
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("amqp_cert_file") is None:
            raise ValueError(f"a key without {ENV_PREFIX}AMQP_CERT_FILE: set both, or neither")
        return value

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs, in the order connections try them."""
        urls: list[str] = _split_commas(self.amqp_url.get_secret_value())
        return urls


def describe_errors(error: ValidationError) -> str:
    lines = ["voucher-bridge cannot start: bad settings"]
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else "?"
        variable = f"{ENV_PREFIX}{field.upper()}"
        message = (
            "is missing, and has no default" if problem["type"] == "missing" else problem["msg"]
        )
        lines.append(f"  {variable}: {message}")
    return "\n".join(lines)


def check_intake(settings: Settings) -> None:
    """Refuse to start the intake worker without what reserving at Jackpot needs."""
    problems = []
    if (
        settings.jackpot_api_signature is None
        or not settings.jackpot_api_signature.get_secret_value()
    ):
        problems.append("BRIDGE_JACKPOT_API_SIGNATURE: is missing; it signs Jackpot sessions")
    if not settings.jackpot_client_id:
        problems.append("BRIDGE_JACKPOT_CLIENT_ID: is missing; POST /v2/token needs it")
    if bool(settings.jackpot_store_id) != bool(settings.jackpot_offer_id):
        problems.append("BRIDGE_JACKPOT_STORE_ID, BRIDGE_JACKPOT_OFFER_ID: set both or neither")
    elif not settings.jackpot_store_id and not settings.jackpot_offers:
        problems.append(
            "BRIDGE_JACKPOT_STORE_ID, BRIDGE_JACKPOT_OFFER_ID: are missing, and "
            "BRIDGE_JACKPOT_OFFERS is empty; no store or offer to reserve at"
        )
    if problems:
        raise SettingsError(
            "\n".join(["voucher-bridge cannot start: bad settings", *(f"  {p}" for p in problems)])
        )


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; exit with a message naming each bad variable."""
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_errors(error)) from error
    if needs_tls(settings.amqp_urls):
        # Load the CA and client certificate now, so a bad file stops the start naming it.
        client_context(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file)
    return settings
