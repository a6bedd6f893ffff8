# syntax=docker/dockerfile:1
# The local stand-in for webhook.site (deploy/standin.py): answers 202 with a messageId, remembers what it got
# (GET /_control/received). Built by docker-compose.yml; by hand, from the repository root:
#   docker build -f deploy/standin.Dockerfile -t message-sender-standin .

# --- build: its three dependencies into a virtualenv ----------------------------------------------------------
FROM python:3.11.10-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "aiohttp>=3.9" "orjson>=3.9" "uvloop>=0.19"

# --- runtime: the virtualenv and the script, as an unprivileged user ------------------------------------------
FROM python:3.11.10-slim-bookworm
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY deploy/standin.py /app/standin.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 STANDIN_PORT=8081
WORKDIR /app
USER 10001:10001
EXPOSE 8081
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/_control/health' % os.environ['STANDIN_PORT'], timeout=4)"
ENTRYPOINT ["python", "/app/standin.py", "--host", "0.0.0.0"]
