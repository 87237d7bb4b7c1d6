"""The HTTP service: ``create_app(store)`` gives a FastAPI app (needs ``sessionkeeper[server]``).

Layout: ``app`` (the factory), ``auth`` (API keys, tenants), ``problems`` (RFC 9457
errors), ``limits`` (body size, JSON parsing), ``metrics`` (Prometheus, access log),
``http`` (responses, ETag, If-Match), ``schemas`` (request bodies), ``routes/`` (one module
per area).
"""

from .app import create_app

__all__ = ["create_app"]
