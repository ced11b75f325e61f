"""The cosyvoice-lite command: `say` writes playable audio with either engine and explains bad input."""
import soundfile as sf

from cosyvoice_lite.cli import main


def test_say_writes_a_24khz_wav_with_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tiny_model_dir))
    out = tmp_path / "hello.wav"
    assert main(["say", "你好，世界。", "-o", str(out), "--speaker", "zh-female"]) == 0
    data, rate = sf.read(out)
    assert rate == 24000 and data.ndim == 1 and len(data) > 0


def test_say_rejects_an_unknown_speaker_listing_the_known_ones(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tiny_model_dir))
    assert main(["say", "hello", "-o", str(tmp_path / "x.wav"), "--speaker", "nobody"]) == 2
    assert "英文女 (en-female)" in capsys.readouterr().err


def test_say_reports_text_with_nothing_to_speak(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tiny_model_dir))
    assert main(["say", "？！…", "-o", str(tmp_path / "x.wav")]) == 2
    assert "nothing to speak" in capsys.readouterr().err


def test_say_fails_cleanly_on_a_broken_model_dir(tmp_path, monkeypatch, capsys):
    (tmp_path / "cosyvoice.yaml").write_text("llm: 1\n")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert main(["say", "hello", "-o", str(tmp_path / "x.wav")]) == 3
    assert "missing llm.pt" in capsys.readouterr().err


def test_say_on_a_base_model_needs_a_saved_voice_and_speaks_with_one(base_model_dir, base_engine, tmp_path,
                                                                      monkeypatch, capsys):
    from golden_data import GOLDEN_MODES

    from cosyvoice_lite.service import SynthesisService
    from cosyvoice_lite.settings import Settings

    for name, value in {"MODEL_DIR": str(base_model_dir), "CACHE_DIR": str(tmp_path), "BACKEND": "torch",
                        "COSYVOICE_MODE": "fast"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "hello.wav"
    assert main(["say", "hello", "-o", str(out)]) == 2
    refused = capsys.readouterr().err
    assert "cosyvoice-300m" in refused and "POST /v1/audio/voices" in refused and not out.exists()

    clip = (GOLDEN_MODES / "prompts" / "en_22050_mono.wav").read_bytes()
    voice = SynthesisService(Settings.from_env(), base_engine).create_voice(clip)["id"]  # the server's store
    assert main(["say", "Hello there.", "-o", str(out), "--speaker", voice]) == 0
    data, rate = sf.read(out)
    assert rate == 24000 and len(data) > 0


def test_download_takes_its_own_options(tmp_path, capsys):
    (tmp_path / "cosyvoice.yaml").write_text("llm: 1\n")
    assert main(["download", "--model", "base", "--verify-only", "--dir", str(tmp_path)]) == 1
    assert "not a usable CosyVoice-300M directory" in capsys.readouterr().err
