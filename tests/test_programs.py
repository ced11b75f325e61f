"""Tests that need a program of the system (chromium, redis-server, ...) ask for it through
conftest.require_program: skipped with the install command where it is missing, a failure under CI=true, and
.ci/run installs every one of them."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, require_program

REQUIRE = re.compile(r"""require_program\(\s*"([^"]+)",\s*"apt-get install ([^"]+)"\s*\)""")


@pytest.fixture
def empty_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))


def test_a_present_program_is_found_on_path():
    assert require_program("sh", "apt-get install dash").endswith("/sh")


def test_a_missing_program_skips_the_test_with_the_install_command_as_the_reason(empty_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^needs chromium: apt-get install chromium$"):
        require_program("chromium", "apt-get install chromium")


@pytest.mark.parametrize("ci", ["", "false", "1"])
def test_only_ci_true_makes_a_missing_program_a_failure(empty_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception):
        require_program("redis-server", "apt-get install redis-server")


def test_a_missing_program_fails_the_test_under_ci(empty_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"needs redis-server: apt-get install redis-server"):
        require_program("redis-server", "apt-get install redis-server")


def test_ci_installs_every_program_the_tests_require():
    required = {m.groups() for path in ROOT.glob("tests/*.py") if path.name != "test_programs.py"
                for m in REQUIRE.finditer(path.read_text())}
    assert {"chromium", "redis-server"} <= {program for program, _ in required}
    ci = (ROOT / ".ci" / "run").read_text()
    for program, package in required:
        assert f"{program}:{package}" in ci, f".ci/run does not install {program} ({package})"
    assert "export CI=true" in ci
