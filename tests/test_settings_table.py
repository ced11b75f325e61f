"""settings.py is the one table of environment variables: every variable the package reads is a Settings field or
an explicit pass-through (the libraries' own), and every one of them is documented in the README."""
from __future__ import annotations

import ast
from dataclasses import fields

import pytest
from conftest import ROOT

from cosyvoice_lite.settings import PASS_THROUGH, Settings

PACKAGE = ROOT / "cosyvoice_lite"


def environment_reads(path) -> tuple[set[str], list[str]]:
    """The variable names a module reads from (or defaults in) os.environ / os.getenv, and the places whose name
    cannot be told from the source (neither a literal nor a module constant of literals)."""
    tree = ast.parse(path.read_text(), str(path))
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, str) or (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                constants[node.targets[0].id] = (value,) if isinstance(value, str) else value
    loops = {}  # `for name in CONSTANT:` -> name stands for each of its strings
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Name):
            if node.iter.id in constants:
                loops[node.target.id] = constants[node.iter.id]

    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
            and node.value.id == "os"

    names, unknown = set(), []

    def key(node, where) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Name) and (node.id in constants or node.id in loops):
            names.update(constants.get(node.id) or loops[node.id])
        else:
            unknown.append(f"{path.relative_to(ROOT)}:{where.lineno}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and is_environ(func.value) and func.attr in ("get", "setdefault", "pop"):
                key(node.args[0], node)
            elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                key(node.args[0], node)
        elif isinstance(node, ast.Subscript) and is_environ(node.value):
            key(node.slice, node)
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            key(node.left, node)
    return names, unknown


def readme_configuration() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Configuration")
    return text[start:text.index("\n## ", start + 1)]


def test_every_settings_field_has_one_environment_variable():
    assert set(Settings.ENV) == {f.name for f in fields(Settings)}
    assert len(set(Settings.ENV.values())) == len(Settings.ENV)
    assert not set(Settings.ENV.values()) & set(PASS_THROUGH)


@pytest.mark.parametrize("variable", sorted({*Settings.ENV.values(), *PASS_THROUGH}))
def test_every_variable_is_documented_in_the_readmes_configuration_table(variable):
    assert f"`{variable}`" in readme_configuration()


def test_outside_settings_py_the_package_reads_only_pass_through_variables():
    """A Settings variable read anywhere else would skip its validation and could disagree with the table."""
    read, unknown = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        names, places = environment_reads(path)
        if path != PACKAGE / "settings.py":  # Settings.from_env reads its table by field, and the cache base
            read |= names
            unknown += places
    assert unknown == [], "reads an environment variable whose name the test cannot see"
    assert read <= set(PASS_THROUGH), read - set(PASS_THROUGH)


def test_every_pass_through_variable_is_still_read_somewhere():
    read = set().union(*(environment_reads(path)[0] for path in PACKAGE.rglob("*.py")))
    assert set(PASS_THROUGH) <= read, set(PASS_THROUGH) - read


def test_the_frontend_data_default_to_what_their_packages_ship():
    settings = Settings.from_env(environ={})
    assert settings.tiktoken_file == "" and settings.wetext_fsts == ""


def test_a_frontend_data_override_that_names_nothing_stops_the_start(tmp_path):
    with pytest.raises(ValueError, match="COSYVOICE_LITE_TIKTOKEN=.* is not a file"):
        Settings.from_env(environ={"COSYVOICE_LITE_TIKTOKEN": str(tmp_path / "missing.tiktoken")})
    with pytest.raises(ValueError, match="COSYVOICE_LITE_WETEXT_FSTS=.* is not a directory"):
        Settings.from_env(environ={"COSYVOICE_LITE_WETEXT_FSTS": str(tmp_path / "missing")})


def test_the_engine_reads_the_frontend_data_the_settings_name(tiny_model_dir, tmp_path):
    from cosyvoice_lite.engines.select import StartupError, load_engine

    empty = tmp_path / "fsts"
    empty.mkdir()
    settings = Settings.from_env({"model_dir": str(tiny_model_dir), "backend": "torch", "torch_threads": 1,
                                  "wetext_fsts": str(empty)}, environ={})
    with pytest.raises(StartupError, match=str(empty / "zh" / "tn")):
        load_engine(settings)
