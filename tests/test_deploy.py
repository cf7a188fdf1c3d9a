"""The deployment: compose.yaml, the Dockerfile, Prometheus and Grafana, checked without Docker.

Each test ties a file under deploy/ (or compose.yaml, or the Dockerfile) to the code it runs:
the `bridge` parser, the settings, the worker roles and the exported metrics.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import prometheus_client
import pytest
import yaml

import shared.metrics  # noqa: F401  (registers every metric the code exports)
from bridge.cli import parser
from ingress.doshii import DOSHII_WEBHOOK_PATH
from sandbox.server import _origin as sandbox_origin
from shared.settings import ENV_PREFIX, PdfOrigin, Settings, load_settings
from workers.main import HANDLER_FACTORIES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BRIDGE_IMAGE = "voucher-bridge:latest"
# The worker roles this build runs (a queue declared for a worker not built yet needs none).
STAGES = list(HANDLER_FACTORIES)
# The services that need the ledger's database, and so may wait for it.
LEDGER_SERVICES = {"db-upgrade", "ledger", "sweeper", "intake"}
SANDBOX = "sandbox"
# A stand-in for the one variable compose.yaml requires (`${BRIDGE_KEY_SECRETS:?...}`).
REQUIRED_FOR_TESTS = {"BRIDGE_KEY_SECRETS": "test-only-key-secret-0123456789"}
NAMED_VOLUMES = {
    "rabbitmq-data",
    "postgres-data",
    "pdfs",
    "spool",
    "prometheus-data",
    "grafana-data",
}
# Variables compose.yaml passes to the bridge ahead of the code that reads them: the ledger's
# roles (a `database_url` setting) and the broker's TLS land separately. Settings ignore
# unknown BRIDGE_* variables.
AHEAD_OF_SETTINGS = {
    "BRIDGE_DATABASE_URL",
    "BRIDGE_AMQP_CA_FILE",
    "BRIDGE_AMQP_CERT_FILE",
    "BRIDGE_AMQP_KEY_FILE",
    "BRIDGE_AMQP_CONNECT_TIMEOUT_S",
}
# Broker settings every bridge service passes through from the shell or .env when set.
BROKER_PASS_THROUGH = AHEAD_OF_SETTINGS - {"BRIDGE_DATABASE_URL"} | {
    "BRIDGE_PUBLISH_TIMEOUT_S",
    "BRIDGE_PREFETCH",
    "BRIDGE_CONCURRENCY",
    "BRIDGE_DELIVERY_LIMIT",
    "BRIDGE_RETRY_TIERS_S",
    "BRIDGE_QUICK_RETRIES",
}
DATABASE_URL = "postgresql://bridge:bridge@postgres:5432/bridge"
LOCK = ROOT / "requirements.lock"
LOCK_TEST_SECTION = "# --- test extra ---"

# What RabbitMQ's Prometheus plugin (rabbitmq_prometheus, 3.13) emits on /metrics/detailed for
# each family the `rabbitmq-queues` job asks for (prometheus_rabbitmq_core_metrics_collector).
RABBITMQ_DETAILED_FAMILIES = {
    "queue_coarse_metrics": {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_detailed_queue_messages",
        "rabbitmq_detailed_queue_process_reductions_total",
    },
    "queue_consumer_count": {"rabbitmq_detailed_queue_consumers"},
}
# What the dashboard must show (one metric per panel the design asks for).
DASHBOARD_MUST_USE = {
    "bridge_ingress_requests_total",
    "bridge_ingress_request_seconds_bucket",
    "bridge_stage_messages_total",
    "bridge_notification_to_doshii_seconds_bucket",
    "bridge_stage_oldest_message_age_seconds",
    "bridge_spool_depth",
    "rabbitmq_detailed_queue_messages",
}

# Compose interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)
_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_PROMQL_NAME = re.compile(r"\b(?:bridge|rabbitmq)_[A-Za-z0-9_]+\b")
_PROMQL_JOB = re.compile(r'\bjob\s*=~?\s*"([^"]*)"')


# Helpers


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Substitute variables the way `docker compose` does; a missing required one raises."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        is_set = current is not None and (current != "" or op is None or ":" not in op)
        if op is not None and op.endswith("?") and not is_set:
            raise LookupError(f"{name}: {arg}")
        if op is not None and op.endswith("-") and not is_set:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def _resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate(node, env)
    if isinstance(node, list):
        return [_resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    return node


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)


def _variables(node: Any) -> set[str]:
    return {
        match["braced"] or match["bare"]
        for text in _strings(node)
        for match in _VARIABLE.finditer(text)
        if not match["escaped"]
    }


def _settings_variables() -> set[str]:
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    logical = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _docker_args(instruction: str) -> list[str]:
    """The JSON (exec form) arguments of the last `instruction`."""
    arguments = [args for keyword, args in _dockerfile() if keyword == instruction][-1]
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"{instruction} must use the exec (JSON) form"
    return [str(part) for part in parsed]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in _dockerfile():
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def _healthcheck_script(test: list[str]) -> str:
    """The Python source of a `["CMD", "python", "-c", SOURCE]` healthcheck."""
    assert test[0] == "CMD", test
    assert Path(test[1]).name == "python", test
    assert test[2] == "-c", test
    return test[3]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _run_python(source: str, env: Mapping[str, str]) -> int:
    completed = subprocess.run(
        [sys.executable, "-c", source],
        env={**os.environ, **env},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return completed.returncode


class _StatusHandler(BaseHTTPRequestHandler):
    """Answers like a bridge process: 200 on /healthz and /readyz, 404 elsewhere."""

    def do_GET(self) -> None:
        status = 200 if self.path in ("/healthz", "/readyz") else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def status_port() -> Iterator[int]:
    """A loopback port serving /healthz and /readyz, like an ingress or a worker."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = _load_yaml(ROOT / "compose.yaml")
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def bridge_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the bridge image (the sandbox included)."""
    return {name: svc for name, svc in services.items() if svc.get("image") == BRIDGE_IMAGE}


@pytest.fixture(scope="module")
def prometheus() -> dict[str, dict[str, Any]]:
    """prometheus.yml's scrape jobs by name."""
    config = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document = json.loads((DEPLOY / "grafana" / "dashboards" / "voucher-bridge.json").read_text())
    assert isinstance(document, dict)
    return document


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _metric_names(expr: str) -> set[str]:
    return set(_PROMQL_NAME.findall(_PROMQL_STRING.sub('""', expr)))


def _exported_metrics() -> set[str]:
    """The series names the bridge's registry exposes, including those with no sample yet."""
    names: set[str] = set()
    for family in prometheus_client.REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def _settings_for(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a service's container gets: the image's ENV, then compose's environment."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    environment = _resolve(service.get("environment", {}), REQUIRED_FOR_TESTS)
    for name, value in {**_image_env(), **environment}.items():
        # A variable with no value is passed through only when set where compose runs.
        if name.startswith(ENV_PREFIX) and value is not None:
            monkeypatch.setenv(name, str(value))
    return load_settings()


# compose.yaml


def test_compose_names_no_project_so_compose_v1_reads_it(compose: dict[str, Any]) -> None:
    # docker-compose 1.29 rejects a top-level `name:`; COMPOSE_PROJECT_NAME or -p name it.
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        key for key in compose if key.startswith("x-")
    }


def test_compose_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    # As written, and as Docker sees it once the variables are substituted.
    for document in (compose, _resolve(compose, REQUIRED_FOR_TESTS)):
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == []
    assert "version" not in compose, "the Compose specification has no `version:`"

    misspelt = copy.deepcopy(compose)
    misspelt["services"]["ingress"]["comand"] = ["ingress"]
    assert list(validator.iter_errors(misspelt)), "the schema must reject an unknown key"


def test_every_bridge_command_parses(bridge_services: dict[str, dict[str, Any]]) -> None:
    assert set(bridge_services) >= {"ingress", SANDBOX, *(str(stage) for stage in STAGES)}
    for name, service in bridge_services.items():
        command = _resolve(service["command"], REQUIRED_FOR_TESTS)
        assert isinstance(command, list), f"{name}: use the exec (list) form"
        try:
            parser().parse_args(command)  # an unknown subcommand or argument exits
        except SystemExit:
            pytest.fail(f"{name}: `bridge {shlex.join(command)}` does not parse")


def test_every_worker_role_has_a_scalable_service(services: dict[str, dict[str, Any]]) -> None:
    worker_port = _default("worker_http_port")
    for stage in STAGES:
        service = services.get(str(stage))
        assert service is not None, f"no service for the {stage} worker"
        assert service["command"] == ["worker", str(stage)]
        assert isinstance(service["deploy"]["replicas"], int)
        assert service["deploy"]["replicas"] >= 1
        # `--scale` starts several containers: a fixed name or host port would collide.
        assert "container_name" not in service
        assert "ports" not in service
        script = _healthcheck_script(service["healthcheck"]["test"])
        assert f"127.0.0.1:{worker_port}/readyz" in script


def test_bridge_services_share_their_setup(bridge_services: dict[str, dict[str, Any]]) -> None:
    for name, service in bridge_services.items():
        assert service["build"] == ".", name
        # The migration runs once; everything else stays up.
        restart = "on-failure" if name == "db-upgrade" else "unless-stopped"
        assert service["restart"] == restart, name
        if name == SANDBOX:
            continue
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert f"pdfs:{_image_env()['BRIDGE_PDF_DIR']}" in service["volumes"], name


def test_compose_uses_only_real_settings(compose: dict[str, Any]) -> None:
    known = _settings_variables() | AHEAD_OF_SETTINGS
    used = {name for name in _variables(compose) if name.upper().startswith(ENV_PREFIX)}
    assert used, "compose.yaml should configure the bridge through BRIDGE_* variables"
    assert used <= known, f"not settings: {sorted(used - known)}"
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if name.startswith(ENV_PREFIX):
                assert name in known, name
                # Each variable is set from the one of the same name, so .env works as expected;
                # one with no value is passed through from the shell or .env when set there.
                assert value is None or _variables(value) == {name}, f"{name}: {value!r}"


def test_key_secrets_have_no_default(bridge_services: dict[str, dict[str, Any]]) -> None:
    environment = bridge_services["ingress"]["environment"]
    with pytest.raises(LookupError, match="BRIDGE_KEY_SECRETS"):
        _resolve(environment, {})


def test_the_defaults_make_valid_settings(
    bridge_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in bridge_services.items():
        if name == SANDBOX:
            continue
        settings = _settings_for(service, monkeypatch)
        assert settings.http_host == "0.0.0.0", name
        assert "@rabbitmq:5672/" in settings.amqp_url.get_secret_value(), name


def test_the_bridge_defaults_point_at_the_sandbox(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = services[SANDBOX]
    assert sandbox["profiles"] == ["demo"]
    args = parser().parse_args(_resolve(sandbox["command"], REQUIRED_FOR_TESTS))
    # The sandbox puts its --host into the PDF links it signs: it must be the name other
    # containers reach it by, mapped to its address (hostname) and to loopback (extra_hosts),
    # where its control routes answer.
    assert args.host == sandbox["hostname"] == SANDBOX
    assert f"{SANDBOX}:127.0.0.1" in sandbox["extra_hosts"]
    jackpot = sandbox_origin(args.host, args.jackpot_port)
    doshii = sandbox_origin(args.host, args.doshii_port)

    settings = _settings_for(services["pdfs"], monkeypatch)
    assert settings.jackpot_api_url == jackpot
    assert settings.doshii_api_url.startswith(f"{doshii}/")
    assert PdfOrigin.parse(jackpot) in settings.pdf_hosts
    assert args.jackpot_api_key == settings.jackpot_api_key.get_secret_value()
    assert args.doshii_client_id == settings.doshii_client_id
    assert args.doshii_client_secret == settings.doshii_client_secret.get_secret_value()

    # The till: its events go to the ingress through lb with the credentials the ingress takes,
    # and the intake's Jackpot session credentials are the sandbox's.
    assert args.till == f"http://lb:{_default('http_port')}{DOSHII_WEBHOOK_PATH}"
    assert settings.jackpot_api_signature is not None
    assert args.jackpot_api_signature == settings.jackpot_api_signature.get_secret_value()
    assert args.jackpot_client_id == settings.jackpot_client_id
    (till_auth,) = _resolve([sandbox["environment"]["BRIDGE_DOSHII_WEBHOOK_AUTH"]], {})
    assert till_auth in [pair.get_secret_value() for pair in settings.doshii_webhook_auth]


def test_the_ingress_keeps_its_spool_and_scales_behind_the_load_balancer(
    services: dict[str, dict[str, Any]],
) -> None:
    port = _default("http_port")
    ingress = services["ingress"]
    assert ingress["command"] == ["ingress"]
    assert f"spool:{_image_env()['BRIDGE_SPOOL_DIR']}" in ingress["volumes"]
    # `--scale ingress=3`: a fixed name or host port would collide.
    assert "ports" not in ingress
    assert "container_name" not in ingress
    script = _healthcheck_script(ingress["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in script

    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    (published,) = _resolve(lb["ports"], {})
    assert published == f"0.0.0.0:{port}:8080"
    (elsewhere,) = _resolve(lb["ports"], {"INGRESS_BIND_ADDR": "127.0.0.2"})
    assert elsewhere.startswith("127.0.0.2:")
    assert lb["depends_on"]["ingress"]["condition"] == "service_healthy"
    mounts = dict(v.split(":")[:2] for v in lb["volumes"])
    assert mounts["./deploy/haproxy/haproxy.cfg"] == "/usr/local/etc/haproxy/haproxy.cfg"

    haproxy = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*bind :8080$", haproxy, flags=re.MULTILINE)
    # Every replica, found by the service's name: one DNS answer per container.
    template = re.search(r"^\s*server-template \S+ (\d+) (\S+) (.*)$", haproxy, flags=re.MULTILINE)
    assert template, "no server-template: the replicas would not be found"
    assert int(template[1]) >= 3
    assert template[2] == f"ingress:{port}"
    assert "check" in template[3].split()
    assert "resolvers docker" in template[3]
    assert "nameserver dns 127.0.0.11:53" in haproxy
    assert "option httpchk GET /readyz" in haproxy

    # The story sends its notifications where Jackpot would: to the load balancer.
    story = services[SANDBOX]["command"]
    assert story[story.index("--story") + 1] == "http://lb:8080"


def test_volumes_are_declared_and_mounts_exist(compose: dict[str, Any]) -> None:
    assert set(compose["volumes"]) == NAMED_VOLUMES
    for name, service in compose["services"].items():
        for volume in _resolve(service.get("volumes", []), {}):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in NAMED_VOLUMES, f"{name}: undeclared volume {source}"


def test_every_broker_setting_can_come_from_env(
    bridge_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in bridge_services.items():
        if name == SANDBOX:
            continue
        environment = service["environment"]
        assert (
            environment["BRIDGE_AMQP_URL"]
            == "${BRIDGE_AMQP_URL:-amqp://guest:guest@rabbitmq:5672/}"
        )
        for variable in BROKER_PASS_THROUGH:
            assert variable in environment, f"{name}: {variable} cannot be set from .env"
            assert environment[variable] is None, f"{name}: {variable} must pass through"
        # The TLS files live in a folder mounted into every bridge container.
        mounts = _resolve(service["volumes"], {})
        assert "./deploy/tls:/etc/voucher-bridge/tls:ro" in mounts, name
    assert (DEPLOY / "tls" / "README.md").exists()
    # Unset, a pass-through variable leaves the bridge's default.
    settings = _settings_for(bridge_services["pdfs"], monkeypatch)
    assert settings.prefetch == _default("prefetch")


def test_postgres_is_ready_for_the_ledger(
    services: dict[str, dict[str, Any]], bridge_services: dict[str, dict[str, Any]]
) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    environment = _resolve(postgres["environment"], {})
    assert environment == {
        "POSTGRES_USER": "bridge",
        "POSTGRES_PASSWORD": "bridge",
        "POSTGRES_DB": "bridge",
    }
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "ports" not in postgres, "the database is reached through the compose network only"
    kind, script = postgres["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    assert script.startswith("pg_isready ")
    assert "$$POSTGRES_USER" in script
    assert "$$POSTGRES_DB" in script
    for name, service in bridge_services.items():
        if name == SANDBOX:
            continue
        url = _resolve(service["environment"], REQUIRED_FOR_TESTS)["BRIDGE_DATABASE_URL"]
        assert url == DATABASE_URL, name
        # Activations must not wait for the ledger's database; the ledger's own roles do.
        waits = "postgres" in service["depends_on"]
        assert waits == (name in LEDGER_SERVICES), name


def test_rabbitmq_has_management_and_prometheus(services: dict[str, dict[str, Any]]) -> None:
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:3.13-management")
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    match = re.fullmatch(r"\[([a-z_]+(?:,[a-z_]+)*)\]\.\s*", plugins)
    assert match, f"enabled_plugins is not an Erlang list term: {plugins!r}"
    assert set(match[1].split(",")) >= {"rabbitmq_management", "rabbitmq_prometheus"}
    published = {port.rsplit(":", 1)[-1] for port in _resolve(rabbitmq["ports"], {})}
    assert published >= {"5672", "15672", "15692"}
    assert rabbitmq["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "check_running"]
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbitmq["volumes"]


def test_compose_healthchecks_compile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test", [])
        if len(test) > 1 and Path(test[1]).name == "python":
            compile(_healthcheck_script(test), f"<{name} healthcheck>", "exec")


def test_compose_healthchecks_probe_readiness(
    services: dict[str, dict[str, Any]], status_port: int
) -> None:
    for name, port in (("ingress", _default("http_port")), ("pdfs", _default("worker_http_port"))):
        script = _healthcheck_script(services[name]["healthcheck"]["test"])
        address = f"127.0.0.1:{port}"
        assert _run_python(script.replace(address, f"127.0.0.1:{status_port}"), {}) == 0
        assert _run_python(script.replace(address, f"127.0.0.1:{_free_port()}"), {}) != 0


# Dockerfile


def test_dockerfile_builds_in_two_stages() -> None:
    stages = [args.split() for keyword, args in _dockerfile() if keyword == "FROM"]
    assert len(stages) == 2
    assert stages[0][0] == stages[1][0] == "python:3.11-slim"
    assert [word.lower() for word in stages[0][1:]] == ["as", "builder"]
    copies = [args for keyword, args in _dockerfile() if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_dockerfile_copies_what_pip_install_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    wanted = {"pyproject.toml", project["project"]["readme"], LOCK.name, *packages}
    copied: set[str] = set()
    for keyword, arguments in _dockerfile():
        if keyword == "COPY" and not arguments.startswith("--"):
            copied.update(source.rstrip("/") for source in arguments.split()[:-1])
    assert copied == wanted
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not copied & ignored, "the Dockerfile copies what .dockerignore leaves out"
    assert ignored >= {".venv", ".git", "var", "tests", "bench", ".env"}


def test_dockerfile_runs_bridge_as_a_non_root_user() -> None:
    users = [args for keyword, args in _dockerfile() if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(args for keyword, args in _dockerfile() if keyword == "RUN")
    created = rf"useradd [^&;]*--uid {user}\b" if user.isdigit() else rf"useradd [^&;]*\b{user}\b"
    assert re.search(created, runs), f"USER {user} is not created by useradd"
    assert _docker_args("ENTRYPOINT") == ["bridge"]
    parser().parse_args(_docker_args("CMD"))


def test_dockerfile_environment_and_ports() -> None:
    env = _image_env()
    bridge_env = {name for name in env if name.startswith(ENV_PREFIX)}
    assert bridge_env <= _settings_variables()
    assert env["BRIDGE_HTTP_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    exposed = {
        int(port) for keyword, args in _dockerfile() if keyword == "EXPOSE" for port in args.split()
    }
    assert exposed == {_default("http_port"), _default("worker_http_port")}


def test_dockerfile_healthcheck_tries_the_ingress_then_the_worker_port(status_port: int) -> None:
    (healthcheck,) = [args for keyword, args in _dockerfile() if keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--timeout=" in options
    script = _healthcheck_script(["CMD", *json.loads(command)])
    for variable in ("BRIDGE_HTTP_PORT", "BRIDGE_WORKER_HTTP_PORT"):
        assert variable in script
        assert variable in _settings_variables()
    closed = str(_free_port())
    ingress = {"BRIDGE_HTTP_PORT": str(status_port), "BRIDGE_WORKER_HTTP_PORT": closed}
    worker = {"BRIDGE_HTTP_PORT": closed, "BRIDGE_WORKER_HTTP_PORT": str(status_port)}
    neither = {"BRIDGE_HTTP_PORT": closed, "BRIDGE_WORKER_HTTP_PORT": closed}
    assert _run_python(script, ingress) == 0
    assert _run_python(script, worker) == 0
    assert _run_python(script, neither) == 1


def test_dockerfile_installs_the_locked_runtime_then_the_project_alone() -> None:
    runs = [args for keyword, args in _dockerfile() if keyword == "RUN"]
    installs = [run for run in runs if " pip " in run and " install " in run]
    locked = [run for run in installs if "--require-hashes" in run]
    assert len(locked) == 1
    assert "--no-deps" in locked[0]
    assert f"/^{LOCK_TEST_SECTION}$/q" in locked[0], "the image installs only the runtime section"
    (project,) = [run for run in installs if run not in locked]
    assert "--no-deps ." in project
    # No installer or build tool in the venv the final stage copies.
    assert any("venv --without-pip /opt/venv" in run for run in runs)
    instructions = _dockerfile()
    final = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final_runs = " ".join(args for keyword, args in instructions[final:] if keyword == "RUN")
    assert "apt-get" not in final_runs, "build tools are for the builder stage only"
    assert " pip " not in final_runs


# The lock


def _lock_sections() -> tuple[set[str], set[str]]:
    runtime_text, separator, test_text = LOCK.read_text().partition(f"\n{LOCK_TEST_SECTION}\n")
    assert separator, f"requirements.lock has no {LOCK_TEST_SECTION!r} line"

    def names(text: str) -> set[str]:
        pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+", text, flags=re.MULTILINE)
        return {re.sub(r"[-_.]+", "-", pin).lower() for pin in pins}

    return names(runtime_text), names(test_text)


def _requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name[0]).lower()


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test_only = _lock_sections()
    assert not runtime & test_only, "a package is pinned twice"
    assert {_requirement_name(r) for r in project["dependencies"]} <= runtime
    assert {_requirement_name(r) for r in project["optional-dependencies"]["test"]} <= (
        runtime | test_only
    )
    assert {"asyncpg", "aiohttp"} <= runtime
    assert "trustme" in test_only
    requirements = [line for line in LOCK.read_text().splitlines() if "==" in line]
    assert all(line.rstrip().endswith("\\") for line in requirements), "every pin has hashes"


def test_make_install_uses_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps --require-hashes -r requirements.lock" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    assert re.search(r"^\$\(STAMP\): .*requirements\.lock", makefile, flags=re.MULTILINE)


# Prometheus


def test_prometheus_scrapes_ingress_workers_and_rabbitmq(
    prometheus: dict[str, dict[str, Any]], services: dict[str, dict[str, Any]]
) -> None:
    def targets(job: str) -> list[str]:
        return [t for config in prometheus[job]["static_configs"] for t in config["targets"]]

    (replicas,) = prometheus["ingress"]["dns_sd_configs"]
    assert replicas["names"] == ["ingress"]
    assert replicas["type"] == "A"
    assert replicas["port"] == _default("http_port")
    assert prometheus["ingress"].get("metrics_path", "/metrics") == "/metrics"

    (discovery,) = prometheus["workers"]["dns_sd_configs"]
    assert set(discovery["names"]) == {str(stage) for stage in STAGES} | {"ledger", "sweeper"}
    assert discovery["type"] == "A"
    assert discovery["port"] == _default("worker_http_port")

    assert targets("rabbitmq") == ["rabbitmq:15692"]
    assert targets("rabbitmq-queues") == ["rabbitmq:15692"]
    assert prometheus["rabbitmq-queues"]["metrics_path"] == "/metrics/detailed"
    assert set(prometheus["rabbitmq-queues"]["params"]["family"]) <= set(RABBITMQ_DETAILED_FAMILIES)

    hosts = {t.split(":")[0] for t in targets("rabbitmq")}
    assert hosts | set(discovery["names"]) | set(replicas["names"]) <= set(services)


# Grafana


def test_dashboard_metrics_are_exported(
    dashboard: dict[str, Any], prometheus: dict[str, dict[str, Any]]
) -> None:
    exported = _exported_metrics()
    families = prometheus["rabbitmq-queues"]["params"]["family"]
    scraped = set().union(*(RABBITMQ_DETAILED_FAMILIES[family] for family in families))
    used: set[str] = set()
    for expr in _exprs(dashboard):
        for name in _metric_names(expr):
            used.add(name)
            if name.startswith("bridge_"):
                assert name in exported, f"{name} is not exported by the bridge: {expr}"
            else:
                assert name in scraped, f"{name} is not scraped from RabbitMQ: {expr}"
        for jobs in _PROMQL_JOB.findall(expr):
            assert set(jobs.split("|")) <= set(prometheus), f"unknown job in {expr}"
    assert used >= DASHBOARD_MUST_USE


def test_dashboard_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = _load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_grafana_loads_the_dashboard_and_lets_viewers_in(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = {source: target for source, target, *_ in (v.split(":") for v in grafana["volumes"])}
    (provider,) = _load_yaml(
        DEPLOY / "grafana" / "provisioning" / "dashboards" / "voucher-bridge.yml"
    )["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/voucher-bridge.json"


# compose.cluster.yaml: three RabbitMQ nodes


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    document = _load_yaml(ROOT / "compose.cluster.yaml")
    assert isinstance(document, dict)
    return document


def test_the_cluster_file_follows_the_compose_specification(cluster: dict[str, Any]) -> None:
    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    env = {**REQUIRED_FOR_TESTS, "RABBITMQ_ERLANG_COOKIE": "test-cookie"}
    for document in (cluster, _resolve(cluster, env)):
        assert [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)] == []
    assert set(cluster) <= {"services", "volumes"} | {k for k in cluster if k.startswith("x-")}


def test_the_cluster_nodes_find_each_other_and_share_a_cookie(
    cluster: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    nodes = {
        "rabbitmq": services["rabbitmq"],
        **{name: svc for name, svc in cluster["services"].items() if name.startswith("rabbitmq-")},
    }
    assert len(nodes) == 3
    conf = (DEPLOY / "rabbitmq" / "cluster.conf").read_text()
    listed = re.findall(
        r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", conf, re.M
    )
    assert sorted(listed) == sorted(nodes)
    assert "peer_discovery_backend = classic_config" in conf
    for name, node in nodes.items():
        merged = cluster["services"][name]
        assert node.get("hostname") == name, f"{name}: the node name must be rabbit@{name}"
        with pytest.raises(LookupError, match="RABBITMQ_ERLANG_COOKIE"):
            _resolve(merged["environment"], {})
        mounts = {v.split(":")[1] for v in merged["volumes"]}
        assert "/etc/rabbitmq/conf.d/20-cluster.conf" in mounts, name
        if name != "rabbitmq":
            assert node["image"] == services["rabbitmq"]["image"]
            assert "/etc/rabbitmq/enabled_plugins" in mounts, name
            assert "ports" not in node, f"{name}: only the first node is published"
            assert node["healthcheck"]["test"][-1] == "check_running"
    declared = set(cluster["volumes"])
    for name in nodes:
        for volume in cluster["services"][name]["volumes"]:
            source = volume.split(":")[0]
            assert source.startswith("./") or source in declared, f"{name}: {source}"


def test_the_bridge_waits_for_every_node_before_declaring_queues(
    cluster: dict[str, Any], bridge_services: dict[str, dict[str, Any]]
) -> None:
    # Quorum queues get members on the nodes in the cluster when they are declared.
    nodes = {"rabbitmq", *(n for n in cluster["services"] if n.startswith("rabbitmq-"))}
    for name in bridge_services:
        if name == SANDBOX:
            continue
        depends_on = cluster["services"][name]["depends_on"]
        extra = {"postgres", "db-upgrade"} - {name} if name in LEDGER_SERVICES else set()
        if name == "db-upgrade":
            extra = {"postgres"}
        assert set(depends_on) == nodes | extra, name
        conditions = {c["condition"] for n, c in depends_on.items() if n != "db-upgrade"}
        assert conditions == {"service_healthy"}, name
