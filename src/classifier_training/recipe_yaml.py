"""Recipe files in YAML, checked against a dataclass schema with file:line errors (torch-free).

:func:`validate_yaml` checks every key and value of one file against the schema (the
:class:`~classifier_training.recipe.Recipe` dataclasses) *before* simple-parsing sees it, so an
unknown key, a value of the wrong type or an invalid choice fails with the file, the line and
the dotted key (simple-parsing alone answers a bad choice with a bare ``KeyError``).
:func:`from_yaml` merges several files section by section (later files win) and decodes the
result into the schema: the default object simple-parsing then parses the CLI flags over.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from simple_parsing.utils import DataclassT

RECIPE_SUFFIXES = (".yaml", ".yml")


class RecipeError(ValueError):
    """A recipe file or flag is invalid; the message names the file, line and key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> None:
    """Raise RecipeError(where + reason) if ``value`` does not fit the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{where}: {value!r} is not a valid choice; choose one of {choices}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                _check_value(value, a, where)
                return
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{where}[{i}]")
        return
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        for i, (item, a) in enumerate(zip(value, args, strict=True)):
            _check_value(item, a, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        for k, v in value.items():
            _check_value(k, args[0], f"{where} key")
            _check_value(v, args[1], f"{where}.{k}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                float(value)
                return
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r} (quote it in YAML)")
        return
    raise RecipeError(f"{where}: unsupported field type {_type_name(tp)}")


def _line_of(node: yaml.Node | None, dotted: list[str]) -> int | None:
    """1-based line of the key at ``dotted`` in a composed YAML tree (None if not found)."""
    line = None
    for key in dotted:
        if not isinstance(node, yaml.MappingNode):
            return line
        for k, v in node.value:
            if k.value == key:
                line = k.start_mark.line + 1
                node = v
                break
        else:
            return line
    return line


def _validate_mapping(
    data: dict[str, Any], cls: type, path: list[str], source: str, root: yaml.Node | None
) -> None:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        keypath = [*path, str(key)]
        dotted = ".".join(keypath)
        line = _line_of(root, keypath)
        where = f"{source}:{line}: {dotted}" if line else f"{source}: {dotted}"
        if key not in names:
            valid = ", ".join(sorted(names))
            raise RecipeError(f"{where}: unknown key; valid keys here are: {valid}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields")
            _validate_mapping(value, tp, keypath, source, root)
        else:
            _check_value(value, tp, where)


def validate_yaml(path: str | Path, schema: type) -> dict[str, Any]:
    """Load a recipe YAML and check every key and value against the dataclass ``schema``.

    Returns the parsed mapping. Raises RecipeError naming the file, line and dotted key. Only
    ``.yaml``/``.yml`` files are read (simple-parsing would hand any other suffix, e.g.
    ``.pkl``, to its pickle or JSON loader).
    """
    path = Path(path)
    if path.suffix.lower() not in RECIPE_SUFFIXES:
        raise RecipeError(
            f"{path}: a recipe must be a YAML file ending in .yaml or .yml "
            "(see recipes/ for examples)"
        )
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (see recipes/ for examples)")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (data:, model:, ...)")
    _validate_mapping(data, schema, [], str(path), root)
    return data


def _merge_sections(base: dict[str, Any], over: Mapping[str, Any], cls: type) -> None:
    """Merge ``over`` into ``base`` section by section: a later file overrides single fields of
    a section and keeps the others; a leaf value (a list or a mapping field too) is replaced."""
    hints = typing.get_type_hints(cls)
    for key, value in over.items():
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _merge_sections(base.setdefault(key, {}), value, tp)
        else:
            base[key] = value


def from_yaml(schema: type[DataclassT], paths: Sequence[str | Path]) -> DataclassT:
    """The ``schema`` dataclass described by ``paths`` (later files win) over its defaults.

    Each file is validated by :func:`validate_yaml` first (file:line errors); the merged mapping
    is then decoded by simple-parsing's ``from_dict``, which converts each value to its field's
    type (YAML's ``3e-4`` string to float, lists to tuples).
    """
    from simple_parsing.helpers.serialization.serializable import from_dict

    merged: dict[str, Any] = {}
    for path in paths:
        _merge_sections(merged, validate_yaml(path, schema), schema)
    return from_dict(schema, merged)


__all__ = ["RECIPE_SUFFIXES", "RecipeError", "from_yaml", "validate_yaml"]
