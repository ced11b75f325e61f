"""The model download path, exercised against a local HTTP server holding the golden model files."""
import functools
import http.server
import threading

import pytest
from golden_data import GOLDEN_MODEL

from cosyvoice_lite import download


@pytest.fixture
def file_server():
    """Serve the golden model directory on 127.0.0.1 (a random port) for the duration of a test."""
    assert GOLDEN_MODEL.is_dir(), f"golden model missing at {GOLDEN_MODEL}"
    handler = functools.partial(QuietHandler, directory=str(GOLDEN_MODEL))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_downloads_every_file_and_verifies_the_model(file_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(download.SOURCES, "modelscope", file_server + "/{name}")
    assert download.main(["--dir", str(tmp_path / "m"), "--source", "modelscope"]) == 0
    for name in download.FILES:
        assert (tmp_path / "m" / name).read_bytes() == (GOLDEN_MODEL / name).read_bytes()
    assert "verified" in capsys.readouterr().out


def test_falls_back_to_the_second_source(file_server, tmp_path, monkeypatch):
    monkeypatch.setitem(download.SOURCES, "modelscope", "http://127.0.0.1:9/{name}")  # nothing listens on port 9
    monkeypatch.setitem(download.SOURCES, "huggingface", file_server + "/{name}")
    assert download.main(["--dir", str(tmp_path / "m"), "--timeout", "5"]) == 0


def test_resumes_a_partial_file(file_server, tmp_path, monkeypatch):
    monkeypatch.setitem(download.SOURCES, "modelscope", file_server + "/{name}")
    target = tmp_path / "m"
    target.mkdir()
    whole = (GOLDEN_MODEL / "llm.pt").read_bytes()
    (target / "llm.pt.part").write_bytes(whole[:1000])
    # SimpleHTTPRequestHandler ignores Range, so the resume must notice the 200 and start over.
    download.fetch(file_server + "/llm.pt", target / "llm.pt", timeout=5)
    assert (target / "llm.pt").read_bytes() == whole and not (target / "llm.pt.part").exists()


def test_unreachable_sources_exit_2_with_offline_advice(tmp_path, monkeypatch, capsys):
    for source in download.SOURCES:
        monkeypatch.setitem(download.SOURCES, source, "http://127.0.0.1:9/{name}")
    assert download.main(["--dir", str(tmp_path / "m"), "--timeout", "5"]) == 2
    assert "offline English voice" in capsys.readouterr().err


def test_verify_only_rejects_a_broken_directory(tmp_path, capsys):
    (tmp_path / "cosyvoice.yaml").write_text("llm: 1\n")
    assert download.main(["--dir", str(tmp_path), "--verify-only"]) == 1
    assert "missing llm.pt" in capsys.readouterr().err
