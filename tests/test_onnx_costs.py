"""scripts/onnx_costs.py end to end on the golden set's small ONNX stand-ins, each measuring step in this process
instead of a child of its own (a child imports torch and the frontend again: ~4 s each). Its figures are in
docs/performance.md; nothing here checks a time or a size."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("onnx_costs", ROOT / "scripts" / "onnx_costs.py")
onnx_costs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(onnx_costs)


def test_onnx_costs_measures_both_networks_and_the_voice_path(monkeypatch, capsys):
    def in_process(args, network):
        child = argparse.Namespace(**{**vars(args), "child": network})
        measure = onnx_costs.measure_voice if network == "voice" else onnx_costs.measure_network
        return json.loads(json.dumps(measure(child)))  # what a child prints

    monkeypatch.setattr(onnx_costs, "run_child", in_process)
    monkeypatch.setattr(sys, "argv", ["onnx_costs.py", "--model-dir", str(ROOT / "tests" / "golden-modes" / "model"),
                                      "--seconds", "1", "--repeat", "1", "--torch-threads", "0", "--json"])
    assert onnx_costs.main() == 0
    out = capsys.readouterr().out
    results = json.loads(out.splitlines()[-1])
    tokenizer, encoder = results["networks"]
    assert (tokenizer["file"], encoder["file"]) == ("speech_tokenizer_v1.onnx", "campplus.onnx")
    assert tokenizer["output_shape"] == [50] and encoder["output_shape"] == [1, 192]  # 1 s: 100 frames, 50 tokens
    assert tokenizer["sha256_matches_release"] is False  # stand-ins, told apart from the released files
    for row in (tokenizer, encoder, results["voice"]):
        assert all(key in row for key in ("rss_closed_mb", "rss_closed_trimmed_mb", "other_load"))
    assert "speech_tokenizer_v1.onnx" in out and "KEEP_VOICE_MODELS" in out  # the table
