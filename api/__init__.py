"""The service's web tier (FastAPI) and the database layer the worker shares (`settings`, `db`, `orm`, `storage`:
these four import no FastAPI, so the worker can use them)."""
