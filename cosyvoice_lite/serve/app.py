"""The Flask app factory: settings, engine, the synthesis service, hooks, error handlers and routes in one app."""
from __future__ import annotations

import logging

from flask import Flask

from ..engines import Engine, StartupError, load_engine
from ..service import SynthesisService
from ..settings import Settings
from ..voices import VoiceMapError
from .errors import register_error_handlers
from .hooks import register_hooks
from .openapi import openapi_spec
from .routes import STATIC_DIR, routes

log = logging.getLogger("cosyvoice_lite")


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` overrides settings by field name (e.g. {'queue_size': 2}); 'engine' may be an
    Engine instance to serve instead of the one ``load_engine`` would pick. The engine warms up on the first
    request or on ``app.extensions['cosyvoice_lite'].admission.ensure_started()`` (gunicorn does it after fork)."""
    config = dict(config or {})
    engine = config.pop("engine") if isinstance(config.get("engine"), Engine) else None
    settings = Settings.from_env(config)
    if engine is None:
        engine = load_engine(settings)
    try:
        service = SynthesisService(settings, engine)
    except VoiceMapError as e:
        raise StartupError(str(e)) from None

    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    # the larger of the two bounds; each route reads its body within its own (serve/body.py)
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.max_upload_bytes)
    # '//health' is a 404, not a 308 to an absolute URL built from the client's Host header
    app.url_map.merge_slashes = False
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions["cosyvoice_lite"] = service
    register_hooks(app, service)
    register_error_handlers(app)
    app.register_blueprint(routes(service, openapi_spec(service)))
    admission = service.admission
    log.info("cosyvoice-lite app created: engine=%s speakers=%s in_progress=%d queue=%d timeout=%ss max_chars=%d "
             "auth=%s", engine.name, ",".join(v.name for v in service.voices.voices), admission.max_batch,
             settings.queue_size, settings.request_timeout, settings.max_text_chars,
             "on" if settings.api_key else "off")
    return app
