"""The gunicorn worker class: gunicorn's gthread worker whose own refusals (a request it cannot parse: bad request
line, headers too large, an unsupported Transfer-Encoding, ...) are JSON in the service's error shape, not HTML."""
from __future__ import annotations

import json

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
          431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn.util.write_error sends, as {"error": {...}} JSON."""
    body = json.dumps({"error": {"message": mesg or reason, "type": "invalid_request_error" if status_int < 500
                                 else "server_error", "param": None,
                                 "code": _CODES.get(status_int, "bad_request")}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class JsonErrorWorker(ThreadWorker):
    def init_process(self):
        # gunicorn's Worker.handle_error writes its refusals through this one function of gunicorn.util
        util.write_error = write_json_error
        super().init_process()

    def set_accept_enabled(self, enabled):
        """When the worker stops for good, it also closes its copy of the listening sockets (gunicorn keeps them
        open until the drain ends): once the master has closed its own, new connections are refused at once
        instead of waiting in the kernel's backlog for an accept that never comes."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
