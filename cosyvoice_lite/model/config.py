"""Read an official ``cosyvoice.yaml`` as plain data.

The official code loads the file with hyperpyyaml, which imports and instantiates every class it names
(including training-only parts and GPU-only packages). We only need the numbers and the class names, so the
hyperpyyaml tags are parsed into small data objects here and never executed:

- ``!new:pkg.Class`` with a mapping  -> ``New(target, kwargs)``
- ``!name:pkg.func`` with a mapping -> ``Name(target, kwargs)`` (a function reference with bound arguments)
- ``!apply:pkg.func [args]``         -> ``Apply(target, args)`` (never called; seeds and the like)
- ``!ref <key>``                     -> the value found at ``key`` (dotted paths allowed), resolved lazily;
  simple arithmetic such as ``!ref <a> * 2`` or ``!ref <a> // <b>`` is evaluated on numbers only.

References are resolved only inside the sections that are asked for, so unused training sections that point
at packages we do not have cannot break loading.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The model directory's yaml cannot be read as a CosyVoice v1 configuration."""


@dataclass
class New:
    target: str
    kwargs: dict = field(default_factory=dict)
    args: list = field(default_factory=list)


@dataclass
class Name:
    target: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class Apply:
    target: str
    args: Any = None


@dataclass
class Ref:
    expression: str


MAX_YAML_BYTES = 1 << 20      # the official file is ~10 KB
MAX_ALIASES = 100             # YAML aliases (*x); each may stand for a whole subtree
MAX_RESOLVED_NODES = 200_000  # values produced while resolving one section (anchors and !ref repeat subtrees)
MAX_REF_DEPTH = 50            # !ref <a> -> !ref <b> -> ...
MAX_NUMBER = 2 ** 64          # results of !ref arithmetic


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns hyperpyyaml tags into the data classes above, and refuses many aliases (a
    'billion laughs' file is a few lines of anchors that expand into an exponential tree)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases: not a CosyVoice configuration")
        return super().compose_node(parent, index)


# hyperpyyaml reads YAML 1.2, where ``1e-06`` is a float; PyYAML's 1.1 rules would keep it a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$|^[-+]?\.[0-9_]+$"),
    list("-+0123456789."),
)


def _tagged(make):
    def construct(loader: yaml.Loader, suffix: str, node: yaml.Node):
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return make(suffix, value)
    return construct


def _make_new(target, value):
    if isinstance(value, dict):
        return New(target, dict(value))
    if isinstance(value, list):
        return New(target, {}, list(value))
    return New(target, {}, [] if value in ("", None) else [value])


_Loader.add_multi_constructor("!new:", _tagged(_make_new))
_Loader.add_multi_constructor("!name:", _tagged(lambda t, v: Name(t, dict(v) if isinstance(v, dict) else {})))
_Loader.add_multi_constructor("!apply:", _tagged(lambda t, v: Apply(t, v)))
_Loader.add_constructor("!ref", lambda loader, node: Ref(loader.construct_scalar(node)))
# Other hyperpyyaml tags (!copy, !tuple, !include, !PLACEHOLDER, !module:) do not occur in inference
# sections; keep them as opaque data so that a file using them still parses.
_Loader.add_multi_constructor("!", _tagged(lambda t, v: Apply("!" + t, v)))


_REF = re.compile(r"<([^<>]+)>")
_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _arithmetic(expression: str):
    """Evaluate an expression of numbers and + - * / // % ** only, every value within +-MAX_NUMBER (a huge
    power would otherwise spin for minutes)."""
    if len(expression) > 200:
        raise ConfigError(f"!ref expression longer than 200 characters: {expression[:60]!r}...")

    def bounded(value):
        if isinstance(value, complex) or not abs(value) <= MAX_NUMBER:
            raise ConfigError(f"!ref expression {expression!r} gives a value out of range")
        return value

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return bounded(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) > 64:
                raise ConfigError(f"!ref expression {expression!r} gives a value out of range")
            try:
                return bounded(_ARITHMETIC[type(node.op)](left, right))
            except (ZeroDivisionError, OverflowError) as error:
                raise ConfigError(f"!ref expression {expression!r}: {error}") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return bounded(_ARITHMETIC[type(node.op)](walk(node.operand)))
        raise ConfigError(f"unsupported !ref expression: {expression!r}")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise ConfigError(f"malformed !ref expression: {expression!r}") from None
    return walk(tree)


class Config:
    """A parsed ``cosyvoice.yaml``; ``config[key]`` returns the section with every ``!ref`` resolved."""

    def __init__(self, raw: dict, source: str = "cosyvoice.yaml"):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        self.raw = raw
        self.source = source
        self._budget = MAX_RESOLVED_NODES

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def __getitem__(self, key: str):
        self._budget = MAX_RESOLVED_NODES
        return self._resolve(self._lookup(key), (key,))

    def get(self, key: str, default=None):
        return self[key] if key in self.raw else default

    def _lookup(self, path: str):
        node: Any = self.raw
        for part in path.split("."):
            if isinstance(node, New):
                node = node.kwargs
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{self.source}: !ref <{path}> points at nothing")
            node = node[part]
        return node

    def _resolve(self, node, seen: tuple):
        self._budget -= 1
        if self._budget < 0:
            raise ConfigError(f"{self.source}: section <{seen[0]}> expands to more than {MAX_RESOLVED_NODES} values "
                              "(aliases or !ref repeating large subtrees): not a CosyVoice configuration")
        if len(seen) > MAX_REF_DEPTH:
            raise ConfigError(f"{self.source}: !ref chain deeper than {MAX_REF_DEPTH} "
                              f"(<{seen[1]}> -> <{seen[2]}> -> ... -> <{seen[-1]}>)")
        if isinstance(node, Ref):
            return self._resolve_ref(node.expression, seen)
        if isinstance(node, New):
            return New(node.target, self._resolve(node.kwargs, seen), self._resolve(node.args, seen))
        if isinstance(node, Name):
            return Name(node.target, self._resolve(node.kwargs, seen))
        if isinstance(node, dict):
            return {k: self._resolve(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [self._resolve(v, seen) for v in node]
        return node

    def _resolve_ref(self, expression: str, seen: tuple):
        keys = _REF.findall(expression)
        if not keys:
            raise ConfigError(f"{self.source}: malformed !ref {expression!r}")
        for key in keys:
            if key in seen:
                raise ConfigError(f"{self.source}: circular !ref <{key}>")
        if _REF.fullmatch(expression.strip()):
            return self._resolve(self._lookup(keys[0]), seen + (keys[0],))
        values = {key: self._resolve(self._lookup(key), seen + (key,)) for key in keys}
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{self.source}: !ref <{key}> used in arithmetic is not a number")
        return _arithmetic(_REF.sub(lambda m: repr(values[m.group(1)]), expression))


def read_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from error
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_YAML_BYTES} bytes: not a CosyVoice configuration")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text: {error}") from error
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply") from None
    return Config(raw, str(path))
