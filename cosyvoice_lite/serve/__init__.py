"""The HTTP front door: app factory (app.py), hooks, routes, request schema, errors, body reading, the gunicorn
worker and its configuration. The synthesis itself is the transport-neutral service (cosyvoice_lite/service)."""
from ..engines import StartupError, load_engine
from .app import create_app
from .hooks import PUBLIC_ENDPOINTS

__all__ = ["PUBLIC_ENDPOINTS", "StartupError", "create_app", "load_engine"]
