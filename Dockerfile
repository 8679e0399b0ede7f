# seglock server image: `docker build -t seglock .` then `docker compose up` (docs/deployment.md).
#
# Build arguments
#   BASE_IMAGE       any image with Python 3.11 and its venv module (default: the official slim one)
#   TORCH_INDEX_URL  where torch and torchvision come from; empty = PyPI (CUDA wheels, several GB,
#                    they run on a CPU too); https://download.pytorch.org/whl/cpu for a CPU-only
#                    image about five times smaller
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, PIP_TRUSTED_HOST
#                    pip's own settings, for a mirror or a folder of wheels (build stage only)

ARG BASE_IMAGE=python:3.11-slim

# -- build: a virtual environment with seglock and its dependencies -------------------------
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=""
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/seglock/bin:$PATH

SHELL ["/bin/sh", "-eu", "-c"]

RUN python3 -m venv /opt/seglock

WORKDIR /src

# Torch first, from its own index when one is given, so PyPI's (CUDA) build is never pulled in
# beside it; at the versions of requirements-torch.txt. Its own layer: the slowest, changed least.
COPY requirements-torch.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" -r requirements-torch.txt; \
    else \
        pip install -r requirements-torch.txt; \
    fi

# Then every other dependency (the SDK's, the `server` and `postgres` extras') at the exact versions
# and SHA-256 hashes of requirements.lock: a changed or substituted wheel fails the build.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./

# The project itself, demo models (models/zoo) included as package data.
COPY app ./app
COPY client ./client
COPY keystore ./keystore
COPY models ./models
RUN pip install --no-deps . \
    && seglock --help > /dev/null

# -- runtime: the virtual environment, a non-root user and a home volume --------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="seglock" \
      org.opencontainers.image.description="Serve semantic-segmentation models that are useless to whoever steals them" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid, so that a bind-mounted home or secret file can be chown'd to it on the host.
RUN groupadd --gid 10001 seglock \
    && useradd --uid 10001 --gid seglock --no-create-home --no-log-init \
        --home-dir /var/lib/seglock --shell /usr/sbin/nologin seglock \
    && mkdir -p /var/lib/seglock \
    && chown seglock:seglock /var/lib/seglock \
    && chmod 0700 /var/lib/seglock

COPY --from=build /opt/seglock /opt/seglock

ENV PATH=/opt/seglock/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    SEGLOCK_HOME=/var/lib/seglock \
    SEGLOCK_REQUIRE_MASTER_KEY=1 \
    SEGLOCK_HOST=0.0.0.0 \
    SEGLOCK_PORT=8000

USER 10001:10001
WORKDIR /var/lib/seglock
VOLUME ["/var/lib/seglock"]
EXPOSE 8000

# SEGLOCK_REQUIRE_MASTER_KEY=1: the server refuses to start unless SEGLOCK_MASTER_KEY(_FILE) or
# SEGLOCK_MASTER_PASSPHRASE(_FILE) is given; a master.key is never made in (or read from) the home
# volume. `-e SEGLOCK_DEV=1` lifts this for a throwaway development run.

# Liveness with the standard library (the image has no curl); the first start imports and
# re-keys the demo models before the port opens, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SEGLOCK_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["seglock"]
CMD ["serve"]
