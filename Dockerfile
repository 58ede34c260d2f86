# One image for the four services, the migrate job and the `wa` CLI; compose and Kubernetes
# pick the command (the same `python -m services.<name>` that `make run` starts).
#
# Pinned: the base image by digest (python:3.11-slim; refresh with
# `docker buildx imagetools inspect python:3.11-slim`), uv by version, every Python package by
# uv.lock. Runs as an unprivileged user on a read-only root filesystem: nothing is written
# under /app at run time (bytecode is compiled here, generated gRPC code too), RUN_DIR is
# under /tmp (a tmpfs in docker-compose.yml, an emptyDir in Kubernetes). No secret is ever
# copied in (.dockerignore keeps out .env, .run/ and deploy/tls/); secrets arrive at run time.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN pip install "uv==${UV_VERSION}"
WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-default-groups --no-install-project

COPY . .
# The project itself is installed editable (its .pth points at /app and /app/gen): the code
# finds db/migrations and config/ next to itself. Then the gRPC code, then bytecode for all
# of it, checked by hash-free "unchecked" pycs since nothing in the image ever changes.
RUN uv sync --frozen --no-default-groups \
 && .venv/bin/python -m devtools.codegen \
 && .venv/bin/python -m compileall -q --invalidation-mode unchecked-hash \
      common services cli devtools fastotel gen

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/app/.venv/bin:$PATH" \
    HOME=/tmp \
    RUN_DIR=/tmp/wa
# A numeric user, so that Kubernetes' runAsNonRoot can verify it. The code stays root-owned:
# the services cannot change it even where the root filesystem is writable. The directories
# under /var/lib/wa/tls are the mount points of docker-compose.yml's certs job, and /etc/wa/tls
# the services' mount point of the same volumes. Each is this user's: an empty named volume
# takes the owner and mode of the mount point of whichever container is created with it
# first, and `docker compose up` creates every container before it starts the certs job, so
# a root-owned /etc/wa/tls would leave the job unable to write its files.
RUN groupadd --system --gid 10001 wa \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp wa \
 && install -d -o 10001 -g 10001 -m 0700 \
      /var/lib/wa/tls/ca /var/lib/wa/tls/state /var/lib/wa/tls/agent /var/lib/wa/tls/dlq \
      /var/lib/wa/tls/gateway /var/lib/wa/tls/operator /var/lib/wa/tls/console /etc/wa/tls
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001

EXPOSE 8080 50051 50052 50053 9100
CMD ["python", "-m", "services.gateway"]
