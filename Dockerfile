# syntax=docker/dockerfile:1
#
# streamcl: the streaming continual learner as a container.
#
#   docker build -t streamcl:latest .
#   docker run --rm -e STREAMCL_BOOTSTRAP_SERVERS=kafka:9092 -e STREAMCL_INPUT_SHAPE='[784]' \
#       -p 9100:9100 -v streamcl-data:/data streamcl:latest
#
# `streamcl run` reads every setting from STREAMCL_<NAME> environment variables (see the
# README's configuration reference); STREAMCL_INPUT_SHAPE has no default and must be given.
# Without STREAMCL_BOOTSTRAP_SERVERS the embedded broker starts inside the container.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: a virtual environment with CPU-only torch and streamcl ---------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU-only index, so the project's `torch` range keeps this build
# instead of pulling a CUDA one (the README's install order)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamcl ./streamcl
RUN pip install --no-cache-dir . "confluent-kafka==2.16.1"

# -- runtime: the venv on a clean slim image, as a non-root user -------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="streamcl" \
      org.opencontainers.image.description="Event-sourced streaming online continual learner: Kafka in, continually refreshed models out" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

RUN groupadd --system --gid 10001 streamcl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin streamcl \
    && mkdir -p /data \
    && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMCL_SNAPSHOT_DIR=/data/snapshots \
    STREAMCL_REGISTRY=/data/registry \
    STREAMCL_METRICS_PORT=9100

WORKDIR /data
USER 10001:10001
VOLUME /data
EXPOSE 9100

# liveness: /healthz on the metrics port (python, since the slim image has no curl); an HTTP
# error (503: the loop is wedged) or a refused connection exits non-zero
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STREAMCL_METRICS_PORT', '9100') + '/healthz', timeout=4)"]

# SIGTERM drains: the batch in flight finishes, a snapshot is taken, offsets are committed
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamcl"]
CMD ["run"]
