"""`python -m inference`: one inference server (one per GPU), listening on NEAT_INFERENCE_HOST:NEAT_INFERENCE_PORT
(`--host` / `--port` override them)."""

from __future__ import annotations

import argparse

import uvicorn

from control.settings import get_settings
from inference.server import create_app
from neat_core.serving.scheduler import engines_own_the_threads


def main() -> None:
    engines_own_the_threads()  # before torch runs anything here: one OpenMP team per engine, none elsewhere
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.inference_host)
    parser.add_argument("--port", type=int, default=settings.inference_port)
    args = parser.parse_args()
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
