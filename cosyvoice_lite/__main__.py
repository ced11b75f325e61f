"""``python -m cosyvoice_lite ...``: the ``cosyvoice-lite`` command (serve, say, wyoming, download)."""
import sys

from .cli import main

sys.exit(main())
