# syntax=docker/dockerfile:1
# voucher-bridge: one image for every role. `bridge run` (the default) serves the ingress and
# every worker in one process; compose.yaml runs `bridge ingress` and `bridge worker ROLE`.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv without pip or setuptools: the base image's pip fills it, so the final stage carries
# no installer or build tool, only what runs.
RUN python -m venv --without-pip /opt/venv
WORKDIR /src
# The runtime section of the lock (everything above the test extra), pinned and hashed: the
# same versions `make install` tests with. Then the project itself, with nothing resolved anew.
COPY requirements.lock ./
RUN sed '/^# --- test extra ---$/q' requirements.lock > runtime.lock \
    && python -m pip --python /opt/venv/bin/python install --no-deps --require-hashes \
        -r runtime.lock
# Only what `pip install .` needs: the metadata, the readme it names, and the five packages.
COPY pyproject.toml README.md ./
COPY ingress/ ingress/
COPY workers/ workers/
COPY shared/ shared/
COPY sandbox/ sandbox/
COPY bridge/ bridge/
# `pip check`: the lock's runtime section must hold every dependency pyproject.toml names.
RUN python -m pip --python /opt/venv/bin/python install --no-deps . \
    && python -m pip --python /opt/venv/bin/python check
# The wheels' compiled extensions carry their symbol tables (uvloop's alone is 13 MB): strip
# them here, where binutils may live, and check the bridge still imports and parses.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils >/dev/null \
    && find /opt/venv -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/venv/bin/python -c "import uvloop, asyncpg, aiohttp, pydantic_core, orjson, multidict" \
    && /opt/venv/bin/bridge --help >/dev/null

FROM python:3.11-slim
# A fixed uid above the system range, so volume ownership is the same on every host.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --home-dir /srv --no-create-home \
        --shell /usr/sbin/nologin bridge \
    && mkdir -p /srv/var/pdfs /srv/var/spool \
    && chown -R bridge:bridge /srv
COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv
# Numeric, so a runtime that checks runAsNonRoot can tell without reading /etc/passwd.
USER 10001:10001
# BRIDGE_HTTP_HOST: inside a container the status and ingress ports must answer off loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRIDGE_HTTP_HOST=0.0.0.0 \
    BRIDGE_PDF_DIR=/srv/var/pdfs \
    BRIDGE_SPOOL_DIR=/srv/var/spool
# 8080: the ingress (BRIDGE_HTTP_PORT); 9100: a worker's /healthz, /readyz, /metrics
# (BRIDGE_WORKER_HTTP_PORT).
EXPOSE 8080 9100
# Alive if the ingress answers /healthz, else a worker's status port does: the same check
# fits `bridge run`, `bridge ingress` and `bridge worker ROLE`, with no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, sys, urllib.request\nfor var, port in (('BRIDGE_HTTP_PORT', '8080'), ('BRIDGE_WORKER_HTTP_PORT', '9100')):\n    try:\n        urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(var, port)}/healthz', timeout=2)\n    except Exception:\n        continue\n    sys.exit(0)\nsys.exit(1)"]
ENTRYPOINT ["bridge"]
CMD ["run"]
