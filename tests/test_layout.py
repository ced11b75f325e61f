"""The package's rooms hold what their names say: HTTP lives in serve/ alone, the networks know nothing of the
runtime around them, and the synthesis service knows no transport. Read from the source (every import, those inside
functions too), so that a lazy import cannot hide a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cosyvoice_lite"


def imports() -> dict[str, set[str]]:
    """module ('serve.routes') -> absolute names it imports ('flask', 'cosyvoice_lite.service', ...)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(package[:len(package) - node.level + 1])
                    names.add(".".join(["cosyvoice_lite", *base, *([node.module] if node.module else [])]))
                else:
                    names.add(node.module)
        found[module] = names
    return found


def room(module: str) -> str:
    return module.split(".")[0]


def test_only_serve_imports_flask_or_werkzeug_or_gunicorn():
    offenders = {m: sorted(n for n in names if n.split(".")[0] in ("flask", "werkzeug", "gunicorn"))
                 for m, names in imports().items() if room(m) != "serve"}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_model_imports_nothing_of_the_runtime_around_it():
    runtime = {"decode", "engines", "serve", "service", "backends", "cache", "voices"}
    offenders = {m: sorted(n for n in names if n.startswith("cosyvoice_lite.")
                           and n.split(".")[1] in runtime)
                 for m, names in imports().items() if room(m) == "model"}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_service_and_the_engines_know_no_front_door():
    doors = {"serve", "cli", "wyoming"}
    offenders = {m: sorted(n for n in names if n.startswith("cosyvoice_lite.") and n.split(".")[1] in doors)
                 for m, names in imports().items() if room(m) in ("service", "engines", "decode", "voices")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_test_tooling_is_not_in_the_runtime_package():
    assert not (PACKAGE / "parity.py").exists() and not (PACKAGE / "model" / "random_model.py").exists()
