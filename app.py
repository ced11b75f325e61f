"""gunicorn entry point: ``gunicorn -c gunicorn.conf.py app:app`` (settings come from environment variables;
see cosyvoice_lite/settings.py)."""
from cosyvoice_lite.serve.wsgi import app  # noqa: F401
