"""The worker class uses private names of gunicorn (serve/worker.py); serve/gunicorn_check.py checks them at
start-up. On the pinned gunicorn the check passes; when a name is missing or changed, the server refuses to start,
naming it and the gunicorn version, before it listens."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import gunicorn
import pytest
from conftest import ROOT, free_port
from gunicorn import util
from gunicorn.config import Config
from gunicorn.http import unreader
from gunicorn.workers import base, gthread

from cosyvoice_lite.serve import worker
from cosyvoice_lite.serve.gunicorn_check import TESTED_GUNICORN, GunicornIncompatible, check_gunicorn, missing_names


def wrap_init(monkeypatch, cls, after):
    """Make ``cls(...)`` run ``after(instance)`` once its own __init__ is done."""
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        after(self)
    monkeypatch.setattr(cls, "__init__", init)


def rename_unreader_buffer(self):
    self.buffer = self.__dict__.pop("buf")


def handle_error_writing_html(self, req, client, addr, exc):
    client.sendall(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")


# (what changes in gunicorn, the name the check must report)
CHANGES = {
    "_DEFER removed": (lambda mp: mp.delattr(gthread, "_DEFER"), "gunicorn.workers.gthread._DEFER (missing"),
    "write_error removed": (lambda mp: mp.delattr(util, "write_error"), "gunicorn.util.write_error (missing"),
    "write_error takes other arguments": (lambda mp: mp.setattr(util, "write_error", lambda sock, exc: None),
                                          "gunicorn.util.write_error (a function (sock, status_int, reason, mesg)"),
    "handle_error stops calling write_error": (lambda mp: mp.setattr(base.Worker, "handle_error",
                                                                     handle_error_writing_html),
                                               "Worker.handle_error (calls util.write_error"),
    "finish_request renamed": (lambda mp: mp.delattr(gthread.ThreadWorker, "finish_request"),
                               "ThreadWorker.finish_request (missing"),
    "pending_conns renamed": (lambda mp: wrap_init(mp, gthread.ThreadWorker, lambda w: delattr(w, "pending_conns")),
                              "ThreadWorker.pending_conns (missing"),
    "nr_conns no longer an int": (lambda mp: wrap_init(mp, gthread.ThreadWorker, lambda w: setattr(w, "nr_conns", [])),
                                  "ThreadWorker.nr_conns (an int count of open connections; found list)"),
    "TConn.data_ready removed": (lambda mp: wrap_init(mp, gthread.TConn, lambda c: delattr(c, "data_ready")),
                                 "TConn.data_ready (missing"),
    "the parser's buffer renamed": (lambda mp: wrap_init(mp, unreader.Unreader, rename_unreader_buffer),
                                    "TConn.parser.unreader.buf (missing"),
}


def test_the_installed_gunicorn_is_the_pinned_one_and_passes_the_check():
    pins = re.findall(r"^gunicorn==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pins == [TESTED_GUNICORN] == [gunicorn.__version__]
    assert missing_names() == []
    check_gunicorn()


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_private_name_is_reported_by_name(monkeypatch, change):
    apply, reported = CHANGES[change]
    apply(monkeypatch)
    problems = missing_names()
    assert any(reported in p for p in problems), problems


def test_the_failure_names_the_installed_and_the_pinned_gunicorn(monkeypatch):
    monkeypatch.delattr(gthread, "_DEFER")
    with pytest.raises(GunicornIncompatible) as failure:
        check_gunicorn()
    message = str(failure.value)
    assert "gunicorn.workers.gthread._DEFER" in message
    assert f"installed gunicorn {gunicorn.__version__}" in message and f"gunicorn=={TESTED_GUNICORN}" in message


def test_a_worker_missing_an_attribute_does_not_boot_and_leaves_write_error_alone(monkeypatch):
    monkeypatch.setattr(util, "write_error", util.write_error)  # restored afterwards, whatever happens
    original = util.write_error
    probe = worker.JsonErrorWorker(0, os.getpid(), [], None, 30, Config(), None)
    try:
        del probe.pending_conns
        with pytest.raises(GunicornIncompatible, match=r"ThreadWorker\.pending_conns \(missing"):
            probe.init_process()
        assert util.write_error is original
    finally:
        probe.tmp.close()


def test_a_changed_private_name_stops_the_server_before_it_listens():
    """gunicorn's master loads the worker class (and so runs the check) before it binds or loads the model."""
    port = free_port()
    launch = ("import sys; import gunicorn.workers.gthread as g; del g._DEFER; "
              "from gunicorn.app.wsgiapp import run; sys.argv = ['gunicorn', '-c', 'gunicorn.conf.py', 'app:app']; "
              "run()")
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", launch], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3
    assert "cosyvoice-lite: cannot start:" in proc.stderr and "gthread._DEFER (missing" in proc.stderr, proc.stderr
    assert gunicorn.__version__ in proc.stderr
    assert "Traceback" not in proc.stderr and "Listening at" not in proc.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
