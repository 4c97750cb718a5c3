# streamcl: the streaming continual learner as a container.
#
#   docker build -t streamcl:latest .
#
# Build arguments (defaults are the public sources; the classic builder suffices, no BuildKit):
#   PYTHON_IMAGE    the Python 3.11 base image (default python:3.11-slim-bookworm)
#   TORCH_PIP_ARGS  where pip finds torch's CPU build (default PyTorch's CPU wheel index); for
#                   a wheel folder served locally: --build-arg TORCH_PIP_ARGS="--find-links URL"
#   docker run --rm -e STREAMCL_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 \
#       -e STREAMCL_LEARNER__INPUT_SHAPE='[784]' -p 9100:9100 -v streamcl-data:/data streamcl:latest
#
# `streamcl run` reads every setting from STREAMCL_<SECTION>__<NAME> environment variables (see
# the README's configuration reference); STREAMCL_LEARNER__INPUT_SHAPE has no default and must
# be given. Without STREAMCL_KAFKA__BOOTSTRAP_SERVERS the embedded broker starts inside the
# container.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

# -- builder: a virtual environment with CPU-only torch and streamcl ---------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_PIP_ARGS

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU-only index, so the project's `torch` range keeps this build
# instead of pulling a CUDA one (the README's install order)
# (word splitting of the argument is intended: it holds pip options)
# hadolint ignore=DL3013,SC2086
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_PIP_ARGS}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamcl ./streamcl
RUN pip install --no-cache-dir . "confluent-kafka==2.16.1"

# What a running service never reads (~280 MB of 1.6 GB): the packages' test suites (torch's
# alone is 83 MB), torch's C++ headers (only for compiling extensions) and pip itself. The
# compiled bytecode stays: without it every start would recompile torch (seconds per restart).
RUN site=/opt/venv/lib/python3.11/site-packages \
    && find "$site" -depth -type d \( -name tests -o -name test \) -exec rm -rf {} + \
    && rm -rf "$site/torch/include" \
    && python -m pip uninstall --yes --quiet pip

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
    STREAMCL_SNAPSHOTS__DIR=/data/snapshots \
    STREAMCL_PUBLICATION__REGISTRY=/data/registry \
    STREAMCL_METRICS__PORT=9100

WORKDIR /data
USER 10001:10001
VOLUME /data
EXPOSE 9100 8000

# liveness of whichever command runs (python, since the slim image has no curl): the trainer's
# /healthz on STREAMCL_METRICS__PORT, or `streamcl serve`'s /v2/health/live on its --port (see
# streamcl/healthcheck.py); an HTTP error (503: the loop is wedged) or a refused connection
# exits non-zero
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "streamcl.healthcheck"]

# SIGTERM drains: the batch in flight finishes, a snapshot is taken, offsets are committed
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamcl"]
CMD ["run"]
