"""The model download path, exercised against a local HTTP server laid out as the hosts are: one repository per model
(CosyVoice-300M-SFT, CosyVoice-300M, CosyVoice-300M-Instruct), each holding the golden-modes model (the tiny model and
its two ONNX stand-ins), the base one without spk2info.pt as the official base model."""
import functools
import http.server
import threading

import pytest
from conftest import linked_model
from golden_data import GOLDEN_MODES

from cosyvoice_lite import download

MODEL = GOLDEN_MODES / "model"


@pytest.fixture
def file_server(tmp_path_factory):
    """Serve the repositories on 127.0.0.1 (a random port) for the duration of a test."""
    assert MODEL.is_dir(), f"golden model missing at {MODEL}"
    root = tmp_path_factory.mktemp("hosts")
    for kind, repo in download.MODELS.items():
        linked_model(root, repo, MODEL, leave_out=("spk2info.pt",) if kind == "base" else ())
    handler = functools.partial(QuietHandler, directory=str(root))
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
    monkeypatch.setitem(download.SOURCES, "modelscope", file_server + "/{repo}/{name}")
    assert download.main(["--dir", str(tmp_path / "m"), "--source", "modelscope"]) == 0
    assert {p.name for p in (tmp_path / "m").iterdir()} == set(download.FILES["sft"])
    for name in download.FILES["sft"]:
        assert (tmp_path / "m" / name).read_bytes() == (MODEL / name).read_bytes()
    assert "verified" in capsys.readouterr().out


def test_the_base_model_comes_from_its_own_repository_with_no_spk2info_and_the_voice_files(file_server, tmp_path,
                                                                                           monkeypatch, capsys):
    monkeypatch.setitem(download.SOURCES, "modelscope", file_server + "/{repo}/{name}")
    assert download.main(["--model", "base", "--dir", str(tmp_path / "m"), "--source", "modelscope"]) == 0
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v1.onnx"}
    assert "no built-in speakers" in capsys.readouterr().out


def test_each_model_goes_into_a_directory_named_after_it(file_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(download.SOURCES, "modelscope", file_server + "/{repo}/{name}")
    monkeypatch.setattr(download, "ROOT", tmp_path)
    assert download.main(["--model", "instruct", "--source", "modelscope"]) == 0
    assert (tmp_path / "models" / "CosyVoice-300M-Instruct" / "spk2info.pt").is_file()
    assert f"MODEL_DIR={tmp_path / 'models' / 'CosyVoice-300M-Instruct'}." in capsys.readouterr().out


def test_falls_back_to_the_second_source(file_server, tmp_path, monkeypatch):
    monkeypatch.setitem(download.SOURCES, "modelscope", "http://127.0.0.1:9/{repo}/{name}")  # nothing listens on 9
    monkeypatch.setitem(download.SOURCES, "huggingface", file_server + "/{repo}/{name}")
    assert download.main(["--dir", str(tmp_path / "m"), "--timeout", "5"]) == 0


def test_resumes_a_partial_file(file_server, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    whole = (MODEL / "llm.pt").read_bytes()
    (target / "llm.pt.part").write_bytes(whole[:1000])
    # SimpleHTTPRequestHandler ignores Range, so the resume must notice the 200 and start over.
    download.fetch(file_server + "/CosyVoice-300M-SFT/llm.pt", target / "llm.pt", timeout=5)
    assert (target / "llm.pt").read_bytes() == whole and not (target / "llm.pt.part").exists()


def test_unreachable_sources_exit_2_with_offline_advice(tmp_path, monkeypatch, capsys):
    for source in download.SOURCES:
        monkeypatch.setitem(download.SOURCES, source, "http://127.0.0.1:9/{repo}/{name}")
    assert download.main(["--model", "base", "--dir", str(tmp_path / "m"), "--timeout", "5"]) == 2
    advice = capsys.readouterr().err
    assert "offline English voice" in advice and "--model base" in advice and "iic/CosyVoice-300M.git" in advice


def test_verify_only_rejects_a_broken_directory(tmp_path, capsys):
    (tmp_path / "cosyvoice.yaml").write_text("llm: 1\n")
    assert download.main(["--dir", str(tmp_path), "--verify-only"]) == 1
    assert "missing llm.pt" in capsys.readouterr().err


def test_verify_only_says_a_base_model_without_the_voice_files_cannot_speak(tmp_path, capsys):
    mute = linked_model(tmp_path, "base", MODEL, leave_out=("spk2info.pt", "campplus.onnx"))
    assert download.main(["--model", "base", "--dir", str(mute), "--verify-only"]) == 1
    assert "missing campplus.onnx: the base model speaks only with voices made from a clip" in capsys.readouterr().err


def test_verify_only_says_an_sft_directory_without_spk2info_is_the_base_model(tmp_path, capsys):
    base = linked_model(tmp_path, "sft", MODEL, leave_out=("spk2info.pt",))
    assert download.main(["--dir", str(base), "--verify-only"]) == 1
    refused = capsys.readouterr().err
    assert "missing spk2info.pt" in refused and "--model base" in refused
