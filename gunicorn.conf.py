"""gunicorn settings: ``gunicorn -c gunicorn.conf.py app:app``. They live in the package
(cosyvoice_lite/gunicorn_conf.py) so that an installed ``cosyvoice-lite serve`` uses the same ones."""
from cosyvoice_lite.serve.gunicorn_conf import *  # noqa: F401,F403
