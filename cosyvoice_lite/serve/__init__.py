"""The HTTP service: app factory (app.py), hooks, routes, request schema, errors, body reading, admission,
metrics, settings and the gunicorn configuration, each in its own module."""
from ..engines import StartupError, load_engine
from .app import create_app
from .hooks import PUBLIC_ENDPOINTS

__all__ = ["PUBLIC_ENDPOINTS", "StartupError", "create_app", "load_engine"]
