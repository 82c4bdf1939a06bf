# syntax=docker/dockerfile:1
#
# celery-signal-exporter: the exporter image, and a base for instrumented
# Celery workers (docs/deploy.md, "The image as a worker base").
#
# The build stage installs the package into a virtualenv; the final stage
# copies only that virtualenv onto a fresh slim base, so nothing used to build
# (pip's caches, the source tree, setuptools' build directories) ships.
# tests/integration/test_deploy.py runs the build stage's COPY and RUN steps in a fresh
# virtualenv exactly as written here, with VIRTUAL_ENV and WORKDIR pointed at
# temporary directories: keep every path in a RUN step behind those two.

FROM python:3.11-slim AS build
ENV VIRTUAL_ENV=/opt/celery-signal-exporter \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
# Every dependency ships a pure-Python or manylinux wheel, so no compiler is
# needed even here. pip compiles the .pyc files at install time, so the
# read-only final image never has to write them. kombu[redis]: kombu's Redis
# transport imports `packaging`, which only that extra brings; without it a
# worker built on this image cannot reach Redis. kombu's version is still the
# one celery pins, the extra only adds its dependencies. [sqs]: boto3, for
# the SQS probe (overlays/sqs).
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir ".[sqs]" "kombu[redis]" \
    && "$VIRTUAL_ENV/bin/celery-signal-exporter" --version

FROM python:3.11-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="celery-signal-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Celery driven by Celery's signals" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim" \
      org.opencontainers.image.documentation="docs/deploy.md"
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in production, so
# Python must not try to write .pyc files. TMPDIR: the one writable scratch
# place, mounted as a tmpfs or emptyDir.
ENV VIRTUAL_ENV=/opt/celery-signal-exporter \
    PATH=/opt/celery-signal-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp \
    HOME=/nonexistent
# A fixed high UID/GID (10001) so Kubernetes' runAsNonRoot can check it, and
# /metrics owned by it so that a fresh Docker volume mounted there is writable.
RUN groupadd --system --gid 10001 celery \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin celery \
    && mkdir -p /metrics \
    && chown 10001:10001 /metrics
COPY --from=build /opt/celery-signal-exporter /opt/celery-signal-exporter
USER 10001:10001
EXPOSE 9808
# Docker and compose only; Kubernetes uses the probes in the manifests. A
# worker image built FROM this one should say `HEALTHCHECK NONE` or its own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CELERY_EXPORTER_PORT', '9808'), timeout=4)"]
ENTRYPOINT ["celery-signal-exporter"]
CMD ["serve"]
