"""The private parts of gunicorn that the worker class (serve/worker.py) relies on, checked at start-up.

gunicorn documents the Worker hooks, not the insides of its gthread worker; worker.py reads and changes them
(gthread._DEFER, TConn's parser buffer, the worker's pending_conns and nr_conns, util.write_error, ...).
requirements.txt pins the gunicorn they were read from (TESTED_GUNICORN); should another version be installed
and one of them be renamed or removed, the server refuses to start, naming what is missing, rather than serving
with a worker that fails at the first slow client.

Why not gunicorn's supported gevent worker: it monkey-patches threading, so the engine's scheduler thread becomes a
greenlet and a synthesis stalls the worker's whole event loop (1.5 s of torch work = a 1.5 s stall of /health and
of every slow-client read, measured); with threads left unpatched, a request waiting on the scheduler through
threading primitives stalls it the same way. Only hub-aware hand-offs (gevent's thread pool) avoid that, which means
rewriting every hand-off between requests and the scheduler, and the 408 timeouts and JSON refusals stay custom.
"""
from __future__ import annotations

import collections
import inspect
import socket

TESTED_GUNICORN = "27.0.1"  # the version pinned in requirements.txt (a test keeps the two equal)


class GunicornIncompatible(RuntimeError):
    """The installed gunicorn lacks, or has changed, a private name that serve/worker.py uses."""


def _function(positional: int):
    """A function (or method, self included) that takes ``positional`` positional arguments."""
    def check(value) -> bool:
        if not inspect.isfunction(value):
            return False
        params = inspect.signature(value).parameters.values()
        return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) == positional
    return check


def _uses(*names: str):
    """A function whose code refers to every one of ``names`` (a global or an attribute it reads)."""
    def check(value) -> bool:
        return inspect.isfunction(value) and set(names) <= set(value.__code__.co_names)
    return check


def _is(kind):
    return lambda value: isinstance(value, kind)


def _present(value) -> bool:
    return True


def _has(*methods: str):
    return lambda value: all(callable(getattr(value, m, None)) for m in methods)


def _lookup(root, dotted: str):
    value = root
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def missing_names(worker=None) -> list[str]:
    """Each private gunicorn name worker.py uses that is absent or not of the kind it expects, as
    "name (expected kind)". ``worker``: a running worker whose own attributes are checked too; without one, a probe
    gthread worker is made (as gunicorn's master makes one before a fork: no process-wide change)."""
    from gunicorn import util
    from gunicorn.config import Config
    from gunicorn.workers import base, gthread

    problems: list[str] = []

    def expect(root, label: str, dotted: str, ok, kind: str) -> None:
        try:
            value = _lookup(root, dotted)
        except AttributeError:
            if not any(p.startswith(f"{label}.{dotted} (missing") for p in problems):
                problems.append(f"{label}.{dotted} (missing; {kind})")
            return
        if not ok(value):
            problems.append(f"{label}.{dotted} ({kind}; found {type(value).__name__})")

    # module level: the refusal writer we replace, and the one place gunicorn calls it
    expect(util, "gunicorn.util", "write_error", _function(4), "a function (sock, status_int, reason, mesg)")
    expect(util, "gunicorn.util", "write_nonblock", _function(3), "a function (sock, data, chunked)")
    expect(base, "gunicorn.workers.base", "Worker.handle_error", _uses("util", "write_error"),
           "calls util.write_error")
    expect(gthread, "gunicorn.workers.gthread", "_DEFER", lambda v: v is not None, "a sentinel object")
    expect(gthread, "gunicorn.workers.gthread", "ThreadWorker.finish_request", _uses("_DEFER", "pending_conns"),
           "puts a handle() result of _DEFER on pending_conns")
    # the ThreadWorker methods worker.py overrides and calls through super()
    for method, positional in (("init_process", 1), ("handle", 2), ("finish_request", 3), ("murder_pending", 1),
                               ("handle_request", 3), ("set_accept_enabled", 2)):
        expect(gthread, "gunicorn.workers.gthread", f"ThreadWorker.{method}", _function(positional),
               f"a method taking {positional - 1} argument(s)")
    if problems:
        return problems  # the probes below would only fail on the same names

    cfg = Config()
    # the worker's own state: a probe made as the master makes a worker, or the running worker itself
    probe = None
    if worker is None:
        try:
            probe = worker = gthread.ThreadWorker(0, 0, [], None, 30, cfg, None)
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            return [f"gunicorn.workers.gthread.ThreadWorker(age, ppid, sockets, app, timeout, cfg, log) "
                    f"(cannot be made: {error!r})"]
    try:
        expect(worker, "ThreadWorker", "pending_conns", _is(collections.deque), "a deque of deferred connections")
        expect(worker, "ThreadWorker", "nr_conns", _is(int), "an int count of open connections")
        expect(worker, "ThreadWorker", "poller", _present, "the event loop's selector")
        expect(worker, "ThreadWorker", "sockets", _is(list), "the listening sockets")
        expect(worker, "ThreadWorker", "alive", _is(bool), "a bool")
    finally:
        if probe is not None:
            probe.tmp.close()
    # a connection as accept() makes one (on a socketpair): the flags and methods handle() uses, room for its own
    # attributes, and the read buffer of the parser that init() makes
    ours, theirs = socket.socketpair()
    try:
        try:
            conn = gthread.TConn(cfg, ours, ("127.0.0.1", 0), ("127.0.0.1", 0))
        except Exception as error:  # noqa: BLE001
            return problems + [f"gunicorn.workers.gthread.TConn(cfg, sock, client, server) "
                               f"(cannot be made: {error!r})"]
        expect(conn, "TConn", "initialized", _is(bool), "a bool")
        expect(conn, "TConn", "data_ready", _is(bool), "a bool")
        expect(conn, "TConn", "sock", _is(socket.socket), "the client socket")
        expect(conn, "TConn", "client", _present, "the client address")
        expect(conn, "TConn", "init", callable, "a method that makes the parser")
        expect(conn, "TConn", "close", callable, "a method")
        expect(conn, "TConn", "__dict__", _is(dict), "an instance that takes new attributes")
        if not problems:
            try:
                conn.init()
            except Exception as error:  # noqa: BLE001
                return problems + [f"gunicorn.workers.gthread.TConn.init() (fails on a plain connection: {error!r})"]
            expect(conn, "TConn", "parser.unreader.buf", _has("getvalue"), "a BytesIO of read-ahead bytes")
            expect(conn, "TConn", "parser.unreader.unread", callable, "a method that gives bytes back to the parser")
    finally:
        ours.close()
        theirs.close()
    return problems


def check_gunicorn(worker=None) -> None:
    """Raise GunicornIncompatible, naming every missing private name and the gunicorn version, if worker.py
    cannot run on the installed gunicorn."""
    import gunicorn

    problems = missing_names(worker)
    if problems:
        raise GunicornIncompatible(
            f"the worker class (cosyvoice_lite/serve/worker.py) uses private parts of gunicorn {TESTED_GUNICORN} "
            f"(pinned in requirements.txt); the installed gunicorn {gunicorn.__version__} lacks: "
            + "; ".join(problems) + f". Install gunicorn=={TESTED_GUNICORN}, or update serve/worker.py and "
            "serve/gunicorn_check.py to this version.")
