FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY registry registry
COPY workers workers
COPY api api
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir .
