"""The control plane the web tier and the workers share: settings, the database (engine, rows, migrations), the
job state machine (`control.jobs`), artifact storage, the task queue, job events and API keys.

Torch-free and FastAPI-free (import-linter contracts in pyproject.toml): the slim API image and every worker
import it, and neither drags the other's framework in.
"""
