"""The gunicorn worker class: gunicorn's gthread worker with three changes.

- Requests are buffered by the worker's event loop before a thread takes them: a connection gets a thread only
  once its headers and (Content-Length or chunked, up to MAX_BODY_BYTES) body are all in, so clients that send
  slowly, or connect and send nothing, hold no thread. Headers and body must arrive within HEADER_TIMEOUT +
  BODY_TIMEOUT of the first byte, else the connection is closed with a 408.
- Every write of a response has WRITE_TIMEOUT seconds: a client that stops reading a stream frees its thread.
- A closing connection lingers (reading what the client still sends, so that no reset cuts the last answer) on the
  event loop's poller, not in a blocking read on its thread: a client that neither reads nor closes cannot stall
  every other connection of the worker.
- gunicorn's own refusals (a request it cannot parse: bad request line, headers too large, an unsupported
  Transfer-Encoding, ...) are JSON in the service's error shape, not HTML; a stopping worker closes its listeners.

This reaches into gthread's private names; gunicorn is pinned (requirements.txt) and serve/gunicorn_check.py checks
every one of them when the server starts (in the master, before it listens or loads the model) and again in each
worker, so a gunicorn that changed one refuses to start instead of failing at the first slow client.
"""
from __future__ import annotations

import json
import re
import selectors
import socket
import sys
import time
from functools import partial

from gunicorn import util
from gunicorn.workers import gthread
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import HTTPException

from .hooks import endpoint_label
from ..settings import Settings
from .gunicorn_check import GunicornIncompatible, check_gunicorn

_CODES = {400: "bad_request", 403: "forbidden", 408: "body_timeout", 414: "uri_too_long",
          417: "expectation_failed", 431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_EXPECT = re.compile(rb"\r\nexpect:", re.IGNORECASE)
# the last chunk ('0', maybe with extensions) and the trailer section up to its empty line
_LAST_CHUNK = re.compile(rb"(?:^|\r\n)0+(?:;[^\r\n]*)?\r\n(?:[^\r\n]+\r\n)*\r\n")
HEAD_LIMIT = 64 * 1024  # more than gunicorn's request line and header limits together
LINGER_SECONDS = 2.0     # as gunicorn's own graceful close
LINGER_BYTES = 65536


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn.util.write_error sends, as {"error": {...}} JSON."""
    body = json.dumps({"error": {"message": mesg or reason, "type": "invalid_request_error" if status_int < 500
                                 else "server_error", "param": None,
                                 "code": _CODES.get(status_int, "bad_request")}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


def request_complete(data: bytes, max_body: int) -> bool:
    """Whether ``data`` (bytes received so far on a connection) holds a whole request, or as much of it as a
    thread should wait for: headers plus the body up to max_body (a larger one gets its 413 from the app)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) >= HEAD_LIMIT  # gunicorn refuses it (431/414): no need to wait for more
    head, body = data[:end + 2], data[end + 4:]
    if _EXPECT.search(head):
        return True  # the client waits for '100 Continue' before its body: the app's thread sends it
    match = _CONTENT_LENGTH.search(head)
    if match:
        return len(body) >= min(int(match.group(1)), max_body + 1)
    if _CHUNKED.search(head):
        if body and not body[:1].isalnum():
            return True  # not a chunk size: gunicorn answers 400 at once
        return _LAST_CHUNK.search(body) is not None or len(body) > max_body + 4096
    return True  # no body


def install_json_refusals(worker=None) -> None:
    """gunicorn's Worker.handle_error writes its refusals through util.write_error: replace it, once the check has
    seen that handle_error still calls it (and with the arguments write_json_error takes)."""
    check_gunicorn(worker)
    util.write_error = write_json_error


class JsonErrorWorker(ThreadWorker):
    @classmethod
    def setup(cls):
        """Called by gunicorn's master when it loads the worker class, before it binds or loads the app: an
        incompatible gunicorn stops the server here, with one line saying what is missing."""
        try:
            check_gunicorn()
        except GunicornIncompatible as error:
            sys.stderr.write(f"cosyvoice-lite: cannot start: {error}\n")
            raise SystemExit(3) from None

    def init_process(self):
        install_json_refusals(self)  # checks this worker's attributes too (a failure ends its boot; the master halts)
        settings = Settings.from_env()
        self.read_timeout = settings.header_timeout + settings.body_timeout
        self.body_timeout = settings.body_timeout
        self.write_timeout = settings.write_timeout
        self.max_body = max(settings.max_body_bytes, settings.max_upload_bytes)  # the larger route bound
        self.lingering = {}  # socket -> (deadline, bytes drained)
        super().init_process()

    def handle(self, conn):
        """Buffer the request from the event loop (see the module docstring); hand it to gunicorn when whole."""
        if self.cfg.is_ssl or (conn.initialized and conn.parser.unreader.buf.getvalue()):
            return super().handle(conn)  # read ahead already: gunicorn serves it from memory
        received = getattr(conn, "received", None)
        if received is None:
            received = conn.received = bytearray()
            conn.read_deadline = time.monotonic() + self.read_timeout
        conn.sock.setblocking(False)
        try:
            while len(received) < HEAD_LIMIT + self.max_body + 8192:
                data = conn.sock.recv(65536)
                if not data:
                    return self._drop(conn)  # the client left (or half-closed without a whole request)
                received += data
                conn.last_data = time.monotonic()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return self._drop(conn)
        if not request_complete(bytes(received), self.max_body):
            if time.monotonic() > conn.read_deadline:
                self._refuse_slow(conn, f"the request did not arrive within {self.read_timeout:g} s")
                return self._drop(conn)
            conn.data_ready = False
            return gthread._DEFER  # back to the event loop until more arrives (no thread held)
        conn.received = None
        conn.init()
        conn.parser.unreader.unread(bytes(received))
        conn.data_ready = True
        return super().handle(conn)

    def finish_request(self, conn, fs):
        """gunicorn closes a finished connection with a blocking lingering read on the event loop's thread (up to
        2 s each); here the lingering is left to the poller."""
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:
            result = False
        if result:  # kept alive, or deferred back to the poller (gthread._DEFER): gunicorn's own handling
            return super().finish_request(conn, fs)
        self.nr_conns -= 1
        self._linger(conn.sock)

    def _linger(self, sock) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)  # our FIN; then read until the client's
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, sock))
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = (time.monotonic() + LINGER_SECONDS, 0)

    def _drain(self, sock, _fileobj=None) -> None:
        deadline, drained = self.lingering.get(sock, (0.0, 0))
        try:
            data = sock.recv(LINGER_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        drained += len(data)
        if data and drained < LINGER_BYTES and time.monotonic() < deadline:
            self.lingering[sock] = (deadline, drained)
            return
        self._end_linger(sock)

    def _end_linger(self, sock) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (OSError, ValueError, KeyError):
            pass
        sock.close()

    def murder_pending(self):
        now = time.monotonic()
        for sock in [s for s, (deadline, _) in self.lingering.items() if now > deadline]:
            self._end_linger(sock)
        self._refuse_stalled(now)
        super().murder_pending()

    def _refuse_stalled(self, now: float) -> None:
        """A partial request that has been silent for BODY_TIMEOUT gets its 408 now (gunicorn would close it
        without a word after its keep-alive time)."""
        for conn in [c for c in self.pending_conns if getattr(c, "received", None)]:
            if now - conn.last_data > self.body_timeout or now > conn.read_deadline:
                self.pending_conns.remove(conn)
                try:
                    self.poller.unregister(conn.sock)
                except (OSError, KeyError, ValueError):
                    pass
                self._refuse_slow(conn, f"the request body stopped arriving (nothing for {self.body_timeout:g} s)")
                self._drop(conn)
                self.nr_conns -= 1
                conn.close()

    def _refuse_slow(self, conn, message: str) -> None:
        """A 408 JSON answer, logged and counted like the app's own answers."""
        line = bytes(conn.received or b"").split(b"\r\n", 1)[0].decode("latin-1", "replace").split(" ")
        path = line[1].split("?", 1)[0] if len(line) > 1 else "-"
        self.log.info("408 for %s %s from %s: %s", line[0][:16], path[:100], conn.client[0] if conn.client else "-",
                      message)
        try:
            write_json_error(conn.sock, 408, "Request Timeout", message)
        except OSError:
            pass
        service = getattr(self.wsgi, "extensions", {}).get("cosyvoice_lite")
        if service is not None:
            try:  # the route the request was for, found as Flask would (the app never saw it)
                endpoint, _ = self.wsgi.url_map.bind("localhost").match(path, method=line[0])
            except HTTPException:  # no such route (404, 405, a redirect)
                endpoint = None
            service.metrics.observe_request(endpoint_label(endpoint), 408)

    @staticmethod
    def _drop(conn) -> bool:
        """End the connection at once: a client that left, or was refused for being slow, gets no lingering."""
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return False

    def handle_request(self, req, conn):
        conn.sock.settimeout(self.write_timeout)  # each write (sendall) of the response, in total
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            self.log.info("closing a connection from %s: it took no data for %g s", conn.client[0] if conn.client
                          else "-", self.write_timeout)
            raise StopIteration() from None

    def set_accept_enabled(self, enabled):
        """When the worker stops for good, it also closes its copy of the listening sockets (gunicorn keeps them
        open until the drain ends): once the master has closed its own, new connections are refused at once
        instead of waiting in the kernel's backlog for an accept that never comes."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
