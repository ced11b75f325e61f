"""The WSGI app for gunicorn (``app:app`` at the project root re-exports it; settings come from environment variables;
see cosyvoice_lite/settings.py)."""
import logging
import sys

from cosyvoice_lite.serve import StartupError, create_app

if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

try:
    app = create_app()
except StartupError as e:
    # One clear line instead of a traceback; a non-zero exit and no half-started server.
    logging.getLogger("cosyvoice_lite").critical("cannot start: %s", e)
    sys.exit(3)
