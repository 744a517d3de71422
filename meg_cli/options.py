"""Command-line options derived from the services' config dataclasses, so each default is written once.

A service's config (``EdgeConfig``, ``ChannelServiceConfig``, ``DeviceConfig``) is the single source of its
settings: every field becomes a ``--kebab-case`` option with the field's type, its default shown in the help
and the help text of ``field(metadata={"help": ...})``; a nested dataclass field (``EdgeConfig.engine``)
contributes its own fields. Options the user does not give are left out of the namespace
(``argparse.SUPPRESS``), so :func:`build` leaves them to the dataclass's own defaults.

Why the fields are read from the source (:func:`fields_from_source`) rather than the imported class: the
service modules import torch, so importing them costs seconds, and ``meg edge --help`` must answer at once.
:func:`fields_from_class` reads the same description from the imported class; a test checks the two agree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import operator
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _NoDefault:
    """The default is computed by the dataclass (a ``default_factory``), not a literal."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()
SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}


@dataclass(frozen=True)
class ConfigField:
    """One settable field of a config dataclass; ``path`` runs through nested dataclasses."""

    path: tuple[str, ...]
    type: type
    default: Any = NO_DEFAULT
    help: str = ""
    optional: bool = False       # annotated ``X | None``
    many: bool = False           # annotated ``tuple[X, ...]``

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def key(self) -> str:
        """``"engine.max_batch"``: the field's address in :func:`build`'s values."""
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self) -> str | None:
        if self.default is NO_DEFAULT:
            return None
        if self.many and isinstance(self.default, tuple):
            return " ".join(map(str, self.default)) or "none"
        return "none" if self.default is None else str(self.default)


# ----------------------------------------------------------------------------------------- from source


def _module_source(module: str) -> tuple[ast.Module, Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"cannot find the source of {module}")
    path = Path(spec.origin)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), path


def _class_node(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _imported_from(tree: ast.Module, name: str) -> str | None:
    """The module ``name`` is imported from at the top of ``tree`` (``from M import name``), or None."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return node.module
    return None


def _is_field_call(node: ast.expr | None) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == "field") or \
        (isinstance(func, ast.Attribute) and func.attr == "field")


_ARITHMETIC: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
                                ast.LShift: operator.lshift}


def _literal(node: ast.expr) -> Any:
    """The value of a literal, or of arithmetic on numeric literals (``64 * 1024``); else NO_DEFAULT."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _literal(node.left), _literal(node.right)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        return _ARITHMETIC[type(node.op)](left, right) if numbers else NO_DEFAULT
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NO_DEFAULT  # an expression (a call, a name): the dataclass computes it


def _annotation(node: ast.expr) -> tuple[str, bool, bool]:
    """(type name, optional, many) of an annotation, or ("", ...) when the CLI cannot express it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        node = ast.parse(node.value, mode="eval").body
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        for inner, other in ((node.left, node.right), (node.right, node.left)):
            if isinstance(other, ast.Constant) and other.value is None:
                name, _, many = _annotation(inner)
                return name, True, many
        return "", False, False
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "tuple":
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else []
        if len(elts) == 2 and isinstance(elts[1], ast.Constant) and elts[1].value is Ellipsis:
            name, _, _ = _annotation(elts[0])
            return (name, False, True) if name in SCALARS else ("", False, False)
        return "", False, False
    if isinstance(node, ast.Name):
        return node.id, False, False
    if isinstance(node, ast.Attribute):  # e.g. pathlib.Path
        return node.attr, False, False
    return "", False, False


def fields_from_source(module: str, class_name: str, prefix: tuple[str, ...] = ()) -> list[ConfigField]:
    """The settable fields of dataclass ``module.class_name``, read from its source without importing it.

    Fields whose type the command line cannot express (not a scalar, Path, ``X | None``, ``tuple[X, ...]``
    or a nested dataclass) are left out, as :func:`fields_from_class` leaves them out.
    """
    tree, path = _module_source(module)
    node = _class_node(tree, class_name)
    if node is None:
        raise LookupError(f"no class {class_name} in {path}")
    out: list[ConfigField] = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.simple):
            continue
        name = stmt.target.id
        type_name, optional, many = _annotation(stmt.annotation)
        if type_name == "ClassVar":
            continue
        default: Any = NO_DEFAULT
        help_text = ""
        if _is_field_call(stmt.value):
            assert isinstance(stmt.value, ast.Call)
            for kw in stmt.value.keywords:
                if kw.arg == "default":
                    default = _literal(kw.value)
                elif kw.arg == "metadata":
                    metadata = _literal(kw.value)
                    if isinstance(metadata, dict):
                        help_text = str(metadata.get("help", ""))
        elif stmt.value is not None:
            default = _literal(stmt.value)
        if type_name in SCALARS:
            out.append(ConfigField((*prefix, name), SCALARS[type_name], default, help_text, optional, many))
            continue
        # A nested dataclass: defined in this module or imported into it.
        if not optional and not many and type_name:
            if _class_node(tree, type_name) is not None:
                out += fields_from_source(module, type_name, (*prefix, name))
                continue
            origin = _imported_from(tree, type_name)
            if origin is not None:
                out += fields_from_source(origin, type_name, (*prefix, name))
    return out


# ------------------------------------------------------------------------------------------ from class


def fields_from_class(cls: type, prefix: tuple[str, ...] = ()) -> list[ConfigField]:
    """The settable fields of an imported dataclass (the same description as :func:`fields_from_source`)."""
    hints = typing.get_type_hints(cls)
    out: list[ConfigField] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = many = False
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                continue
            hint, optional = rest[0], True
            args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
            hint, many = args[0], True
        if dataclasses.is_dataclass(hint) and isinstance(hint, type) and not (optional or many):
            out += fields_from_class(hint, (*prefix, f.name))
            continue
        if hint not in SCALARS.values():
            continue
        default = f.default if f.default is not dataclasses.MISSING else NO_DEFAULT
        out.append(ConfigField((*prefix, f.name), hint, default, str(f.metadata.get("help", "")), optional, many))
    return out


# ------------------------------------------------------------------------------------------ argparse


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: ConfigField, *,
               flag: str | None = None, dest: str | None = None, help_text: str | None = None) -> str:
    """Add one option for ``field``; returns its dest. Absent from the namespace unless given."""
    dest = dest or field.key
    text = field.help if help_text is None else help_text
    default = field.default_text()
    if default is not None and "default" not in text:
        text = f"{text} (default: {default})" if text else f"default: {default}"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": text}
    if field.type is bool and not field.many:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = field.type
        kwargs["metavar"] = field.name.upper()
        if field.many:
            kwargs["nargs"] = "*"
    parser.add_argument(flag or field.flag, **kwargs)
    return dest


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, fields: Iterable[ConfigField], *,
                flags: Mapping[str, str] | None = None, exclude: Iterable[str] = ()) -> list[ConfigField]:
    """An option for every field not in ``exclude`` (field keys); ``flags`` renames some (key -> flag)."""
    skip = set(exclude)
    added = []
    for field in fields:
        if field.key in skip:
            continue
        add_option(parser, field, flag=(flags or {}).get(field.key))
        added.append(field)
    return added


def given(namespace: argparse.Namespace, fields: Iterable[ConfigField]) -> dict[str, Any]:
    """The values the user gave for ``fields`` (dests = field keys), keyed by field key."""
    return {f.key: getattr(namespace, f.key) for f in fields if hasattr(namespace, f.key)}


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of dataclass ``cls`` from ``values`` (keyed by field key); absent fields keep defaults."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            inner = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f.name + ".")}
            if inner:
                kwargs[f.name] = build(hint, inner)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def to_argv(fields: Iterable[ConfigField], values: Mapping[str, Any],
            flags: Mapping[str, str] | None = None) -> list[str]:
    """Command-line arguments that give ``values`` (keyed by field key) back to a command built with
    :func:`add_options` over the same fields and ``flags``."""
    argv: list[str] = []
    for field in fields:
        if field.key not in values:
            continue
        value = values[field.key]
        flag = (flags or {}).get(field.key, field.flag)
        if field.type is bool and not field.many:
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif field.many:
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
