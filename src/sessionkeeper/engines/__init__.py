"""Storage engines; each lives in its own module and is imported only when its URL is used."""

from .base import Engine
from .urls import engine_from_url

__all__ = ["Engine", "engine_from_url"]
