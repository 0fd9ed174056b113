"""Inference endpoints (filled in by the serving work)."""

from fastapi import APIRouter

router = APIRouter(tags=["inference"])
