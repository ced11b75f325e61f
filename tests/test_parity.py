"""The acceptance test of the model and frontend: scripts/check_parity.py on the official golden outputs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from golden_data import GOLDEN, assert_matches_checksums

from parity import Golden, model_checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity_run():
    assert (GOLDEN / "manifest.json").is_file(), f"golden data missing at {GOLDEN}"
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_parity.py"), str(GOLDEN)],
                          capture_output=True, text=True, timeout=1200)


def test_check_parity_passes_on_the_golden_set(parity_run):
    assert parity_run.returncode == 0, parity_run.stdout[-4000:] + parity_run.stderr[-4000:]


def test_check_parity_covers_every_golden_case(parity_run):
    cases = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
    printed = {line.split()[0] for line in parity_run.stdout.splitlines() if line and not line.startswith("summary")}
    assert set(cases) <= printed
    n_items = len(json.loads((GOLDEN / "frontend.json").read_text())["items"])
    assert {f"frontend[{i}]" for i in range(n_items)} <= printed


def test_check_parity_prints_a_summary_line(parity_run):
    last = parity_run.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: ") and " 0 failed" in last


def _golden_copy_with_one_case(tmp_path, case):
    """A golden directory holding only `case` (the model directory is linked, not copied)."""
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    manifest["cases"] = {case: manifest["cases"][case]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "model").symlink_to(GOLDEN / "model")
    shutil.copytree(GOLDEN / case, tmp_path / case)
    return tmp_path


def test_a_perturbed_waveform_fails_only_its_stage(tmp_path):
    root = _golden_copy_with_one_case(tmp_path, "flow_037")
    wav = np.load(root / "flow_037" / "wav.npy")
    wav[0, 1000] += 0.01
    np.save(root / "flow_037" / "wav.npy", wav)
    failed = {c.stage for c in model_checks(Golden(root)) if not c.ok}
    assert failed == {"wav (mel+source -> wav)"}


def test_a_changed_speech_token_is_counted_as_a_mismatch(tmp_path):
    root = _golden_copy_with_one_case(tmp_path, "llm_en")
    tokens = np.load(root / "llm_en" / "speech_token.npy")
    tokens[5] = (tokens[5] + 1) % 4096
    np.save(root / "llm_en" / "speech_token.npy", tokens)
    checks = {c.stage: c for c in model_checks(Golden(root))}
    assert checks["speech_token (seeded)"].error == 1 and not checks["speech_token (seeded)"].ok


def test_check_parity_exits_1_when_a_case_cannot_run(tmp_path):
    root = _golden_copy_with_one_case(tmp_path, "flow_037")
    (root / "flow_037" / "z.npy").unlink()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_parity.py"), str(root), "--only", "model"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert any("ERROR" in line and "z.npy" in line for line in result.stdout.splitlines())


def test_the_golden_copy_in_the_repository_matches_its_checksums():
    """tests/golden is a plain-file copy of the official reference outputs; SHA256SUMS lists every file in it."""
    root = Path(__file__).resolve().parent / "golden"
    assert_matches_checksums(root)
