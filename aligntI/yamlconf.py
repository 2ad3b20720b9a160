"""Strict YAML configs bound to dataclasses, for any schema.

A file may extend others (``base:``), use ``${name}`` for ``vars.name`` and take ``dotted.key=value``
overrides; :func:`load` binds the result to a dataclass, checking every key and type, makes the paths absolute
and runs its ``validate()``. Every problem is a :class:`ConfigError` naming the file and the key.

Paths: a field typed :data:`RecipePath` (or :data:`ChatTemplate`) holds a path. A relative one, whether written
in the file, a base or an override, is relative to the repository root (:data:`REPO_ROOT`), never to the current
folder, so a recipe means the same from anywhere; ``~`` is expanded and an absolute path stays as given.
``base:`` files are the exception: they are relative to the file that names them.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


class ConfigError(ValueError):
    """A config is malformed: the message names the file and the key."""


# The checkout holding the package (always installed editable from it): what relative recipe paths start from.
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class PathMarker:
    """The mark of a path field in a schema: :func:`load` resolves it (see the module docstring).

    ``suffix``: only values with this suffix are paths; any other value is a name and stays as given.
    """

    suffix: str | None = None

    def resolve(self, value: str, key: str) -> str:
        if (self.suffix is not None and Path(value).suffix != self.suffix) or Path(value).is_absolute():
            return value
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of no such user
            raise ConfigError(f"{key}: cannot expand the ~ of {value!r}: no such user") from None
        return str(path if path.is_absolute() else REPO_ROOT / path)


RecipePath = Annotated[str, PathMarker()]
# A shipped chat template's name, or a .jinja file: only the file is a path (aligntI/data/formatting.py tells
# them apart by that suffix).
ChatTemplate = Annotated[str, PathMarker(".jinja")]


def load(path: str | Path, overrides: list[str] | None, schema: type):
    """Read ``path`` (with its ``base:`` files), apply ``a.b=value`` overrides, substitute ``${vars}``, build
    ``schema`` from the result, resolve its path fields (:func:`resolve_paths`) and run its ``validate()`` when it
    has one."""
    path = Path(path)
    raw = read_composed(path)
    try:
        for item in overrides or []:
            try:
                apply_override(raw, item)
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML{yaml_problem(err)}") from None
            except (TypeError, AttributeError):  # the dotted path runs through a scalar
                raise ConfigError(f"override {item!r}: the key goes through a value that is not a mapping") \
                    from None
        raw = substitute_vars(raw)
        cfg = from_dict(schema, raw)
        resolve_paths(cfg)  # before validate(), which may open them
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def read_composed(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping merged over its ``base:`` files (paths relative to it, applied in order; the file wins).

    Mappings merge key by key; lists and scalars replace. ``vars`` merge like any mapping, so a file
    overrides only the variables it names.
    """
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base cycle: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        raw = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{yaml_problem(err)}") from err
    if not isinstance(raw, dict):
        got = "the file is empty" if raw is None else f"got {type(raw).__name__} {str(raw)[:40]!r}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys; {got}")
    bases = raw.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, read_composed(path.parent / base, (*chain, path.resolve())))
    return _merge(merged, raw)


def read_utf8(path: Path) -> str:
    """A config file's text; one that is not UTF-8 or cannot be read is a ConfigError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {err.start}; save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line, to follow "not valid YAML": `` at line L, column C: what (context)``."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ": "
    what = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    return where + what + (f" ({context})" if context else "")


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_maps else value
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute_vars(raw: dict) -> dict:
    """Replace ``${name}`` in every string by ``vars.name``; the ``vars`` mapping itself is then dropped.

    Variables may use other variables. A string that is exactly ``${name}`` takes the variable's type.
    """
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"vars: expected a mapping of names to values, got {variables!r}")
    for name, value in variables.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"vars.{name}: expected a string or a number, got {value!r}")

    def resolve(value: Any, key: str, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}" if key else str(k), seen) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{key}.{i}", seen) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def lookup(name: str) -> Any:
            if name not in variables:
                raise ConfigError(f"{key}: unknown variable ${{{name}}} (vars defines {sorted(variables)})")
            if name in seen:
                raise ConfigError(f"vars.{name}: refers to itself through {' -> '.join((*seen, name))}")
            return resolve(variables[name], f"vars.{name}", (*seen, name))

        whole = _VAR.fullmatch(value)
        if whole:
            return lookup(whole.group(1))
        return _VAR.sub(lambda m: str(lookup(m.group(1))), value)

    return {k: resolve(v, k) for k, v in raw.items() if k != "vars"}


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.0.c=value`` in a nested dict/list; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_index(node, part, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def flatten(tree, prefix: str = "") -> dict:
    """A nested mapping by dotted key, as overrides name them: ``{"a": {"b": [x]}}`` -> ``{"a.b.0": x}``; an empty
    mapping or list stays a value."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def under(key: str, prefixes) -> str | None:
    """The first of ``prefixes`` that is ``key`` or a section holding it (``train`` holds ``train.max_steps``)."""
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of length {len(node)}")
    return int(part)


def from_dict(cls: type, data: Any, where: str = ""):
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    label = where or "<top>"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown key (allowed here: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def resolve_paths(cfg, where: str = "") -> None:
    """Resolve, in place, every field of the dataclass tree ``cfg`` whose type carries a :class:`PathMarker`
    (also inside ``X | None``, lists and nested dataclasses)."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        key = f"{where}.{f.name}" if where else f.name
        setattr(cfg, f.name, _resolved(hints[f.name], getattr(cfg, f.name), key))


def _resolved(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        marker = next((m for m in tp.__metadata__ if isinstance(m, PathMarker)), None)
        return marker.resolve(value, key) if marker is not None and isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):  # each option acts only on a value of its own kind
            value = _resolved(option, value, key)
        return value
    if origin is list and isinstance(value, list):
        return [_resolved(typing.get_args(tp)[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp) and isinstance(value, tp):
        resolve_paths(value, key)
    return value


def _coerce(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {options}")
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-3 as a string (no dot in the mantissa): accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        if not value.strip():  # a schema's strings are paths and names: empty is never meant
            raise ConfigError(f"{key}: must not be empty")
        return value
    raise TypeError(f"{key}: unsupported schema type {tp!r}")

