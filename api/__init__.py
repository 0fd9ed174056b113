"""The service's web tier (FastAPI): routes, request/response schemas, auth, quotas, idempotency and the HTTP error
shape. What it shares with the workers (settings, database, job states, storage, queue) lives in `control`."""
