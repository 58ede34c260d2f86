# One image for the four services and the migrate job; compose picks the command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    PATH="/app/.venv/bin:$PATH"

WORKDIR /app
RUN pip install --no-cache-dir "uv>=0.9,<1"

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-default-groups --no-install-project

COPY . .
RUN uv sync --frozen --no-default-groups && python -m devtools.codegen

RUN useradd --system --uid 10001 wa && chown -R wa /app
USER wa

EXPOSE 8080 50051 50052 50053 9101 9102 9103
CMD ["python", "-m", "services.gateway"]
