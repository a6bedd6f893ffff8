# syntax=docker/dockerfile:1
# The gateway: the REST API, Swagger UI, health and metrics.
# Built by docker-compose.yml; by hand, from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t message-sender-gateway .

# --- build: install the distribution (wheels only, no compiler needed) into a virtualenv -------------------
FROM python:3.11.10-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY consumer ./consumer
COPY gateway ./gateway
RUN /opt/venv/bin/pip install .

# --- runtime: the virtualenv only, as an unprivileged user --------------------------------------------------
FROM python:3.11.10-slim-bookworm
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LOG_FORMAT=json GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8080
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ['GATEWAY_PORT'], timeout=4)"
ENTRYPOINT ["message-sender-gateway"]
