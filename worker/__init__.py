"""The training worker: a Celery task that claims a queued job row, runs `neat_core.train` on it, and reports
progress, checkpoints and the outcome back to the database. It holds no training logic of its own.

    celery -A worker.app worker --pool=solo --concurrency=1 -Q training   # one per GPU
"""
