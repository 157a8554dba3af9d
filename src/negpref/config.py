"""Config dataclasses <-> YAML files <-> command-line flags.

Each verb has one config dataclass with documented fields (``metadata={"help": ...}``), in the
manner of TRL's ``*Config`` classes. Values come from the dataclass defaults, then a YAML file
(``--config``), then explicit flags, later ones winning. Every field is a flag
(``--field-name``); ``validate()`` on the dataclass, when present, names the bad field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from negpref.errors import NegprefError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of dataclass ``cls`` to ``parser``."""
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of settings (flags override it)"
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(tp) in (list, tuple):
            (item,) = get_args(tp)[:1]
            parser.add_argument(_flag(f.name), nargs="+", type=item, **kwargs)
        else:
            parser.add_argument(
                _flag(f.name), type=tp if tp in (int, float, str) else str, **kwargs
            )


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise NegprefError(f"{source}: field '{name}' may not be null")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if tp is str and isinstance(value, (str, Path)):
            return str(value)
        if get_origin(tp) in (list, tuple):
            (item,) = get_args(tp)[:1]
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(f"{name}[]", v, item, source) for v in items]
        if tp not in (bool, float, int, str):
            return value
    except TypeError:
        pass
    want = getattr(tp, "__name__", str(tp))
    raise NegprefError(f"{source}: field '{name}' must be {want}, got {value!r}")


def build_config(cls: type, args: argparse.Namespace | None = None, **overrides: Any):
    """Build ``cls`` from defaults, ``args.config`` (YAML), flags in ``args``, then overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) if args is not None else None
    if config_path is not None:
        source = str(config_path)
        try:
            loaded = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise NegprefError(f"--config {config_path}: file not found") from None
        except yaml.YAMLError as e:
            raise NegprefError(f"--config {config_path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise NegprefError(f"--config {config_path}: expected a mapping of field: value")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise NegprefError(
                    f"{source}: unknown field '{key}'; known fields: {', '.join(sorted(names))}"
                )
            values[key] = _coerce(key, value, hints[key], source)
    if args is not None:
        for key in names:
            if key in vars(args):
                values[key] = _coerce(key, getattr(args, key), hints[key], _flag(key))
    values.update(overrides)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
    }


def require(condition: bool, field: str, value: Any, rule: str) -> None:
    """Raise a one-line error naming the option when ``condition`` is false."""
    if not condition:
        raise NegprefError(f"{_flag(field)}: {rule}, got {value!r}")
