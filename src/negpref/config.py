"""Config dataclasses <-> YAML files <-> command-line flags.

Each verb has one config dataclass with documented fields (``metadata={"help": ...}``), in the
manner of TRL's ``*Config`` classes. Values come from the dataclass defaults, then a YAML file
(``--config``), then explicit flags, later ones winning. Every field is a flag
(``--field-name``); ``validate()`` on the dataclass, when present, names the bad field.

Rules for every config: floats are finite (``inf``/``nan`` are refused, a field that means
"no limit" says so with 0), and seeds (fields ``seed``, ``*_seed``, ``seeds``) are >= 0, since
numpy's generators refuse negative seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
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
        return tp, len(args) < len(get_args(tp))  # e.g. dict | str | None: None allowed
    return tp, False


def _own_fields(cls: type) -> set[str]:
    """Fields ``cls`` declares or redeclares itself, rather than inherits from transformers."""
    try:
        from transformers import TrainingArguments
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {f.name for f in dataclasses.fields(cls)}
    if not issubclass(cls, TrainingArguments):
        return {f.name for f in dataclasses.fields(cls)}
    own: set[str] = set()
    for klass in cls.__mro__:
        if klass is TrainingArguments:
            break
        own |= set(vars(klass).get("__annotations__", {}))
    return own


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of dataclass ``cls`` to ``parser``.

    Fields a config inherits unchanged from ``transformers.TrainingArguments`` are listed in a
    group of their own; a ``verbosity`` field also gets ``--quiet`` and ``--verbose``.
    """
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of settings (flags override it)"
    )
    hints = typing.get_type_hints(cls)
    own = _own_fields(cls)
    inherited = parser.add_argument_group(
        "transformers.TrainingArguments",
        "the Trainer's own settings (see its documentation), accepted as they are",
    )
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or not f.init:
            continue
        target = parser if f.name in own else inherited
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("%", "%%")
        if default not in (None, [], "") and not isinstance(default, enum.Enum):
            help_text += f" (default: {default})"
        elif isinstance(default, enum.Enum):
            help_text += f" (default: {default.value})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flags = [_flag(f.name), *f.metadata.get("aliases", [])]
        if tp is bool:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(tp) in (list, tuple):
            (item,) = get_args(tp)[:1]
            target.add_argument(*flags, nargs="+", type=item, **kwargs)
        else:
            target.add_argument(*flags, type=tp if tp in (int, float, str) else str, **kwargs)
    if "verbosity" in hints:
        quiet = parser.add_mutually_exclusive_group()
        for word in ("quiet", "verbose"):
            quiet.add_argument(
                f"--{word}",
                dest="verbosity",
                action="store_const",
                const=word,
                default=argparse.SUPPRESS,
                help=f"verbosity: {word}",
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
        if tp in (float, int) and isinstance(value, str):
            # YAML 1.1 reads 1e-5 (no dot) as a string
            return tp(value)
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
    except (TypeError, ValueError):
        pass
    want = getattr(tp, "__name__", str(tp))
    raise NegprefError(f"{source}: field '{name}' must be {want}, got {value!r}")


def _is_seed(name: str) -> bool:
    base = name.removesuffix("[]")
    return base in ("seed", "seeds") or base.endswith("_seed")


def _check_value(name: str, value: Any, source: str) -> Any:
    """The rules every config shares (module docstring)."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise NegprefError(f"{source}: field '{name}' must be a finite number, got {v!r}")
        if _is_seed(name) and isinstance(v, int) and v < 0:
            raise NegprefError(f"{source}: field '{name}' is a seed and must be >= 0, got {v!r}")
    return value


def _read_yaml(path: Path) -> Any:
    """A YAML file's content; every way it can be unreadable is one line naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise NegprefError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise NegprefError(f"--config {path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise NegprefError(
            f"--config {path}: not UTF-8 text (byte {e.start}); save the file as UTF-8"
        ) from None
    except OSError as e:
        raise NegprefError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise NegprefError(f"--config {where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as e:
        raise NegprefError(
            f"--config {path}: not valid YAML ({' '.join(str(e).split())})"
        ) from None


def _absolute(value: Any, base: Path, hub: bool) -> Any:
    """A path field's value made absolute against ``base`` (a hub id, not on disk, stays)."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    resolved = (base / path).resolve()
    if hub and not resolved.exists():
        return value
    return str(resolved)


def build_config(cls: type, args: argparse.Namespace | None = None, **overrides: Any):
    """Build ``cls`` from defaults, ``args.config`` (YAML), flags in ``args``, then overrides.

    Path fields (``metadata={"path": True}``) become absolute: relative to the YAML file's
    folder for values from the YAML, to the working directory for flags, so a saved config
    replays the run from anywhere.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = set(fields)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) if args is not None else None
    if config_path is not None:
        source = str(config_path)
        loaded = _read_yaml(Path(config_path)) or {}
        if not isinstance(loaded, dict):
            raise NegprefError(f"--config {config_path}: expected a mapping of field: value")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise NegprefError(
                    f"{source}: unknown field '{key}'; known fields: {', '.join(sorted(names))}"
                )
            value = _check_value(key, _coerce(key, value, hints[key], source), source)
            values[key] = _resolve_path(fields[key], value, Path(config_path).resolve().parent)
    if args is not None:
        for key in names:
            if key in vars(args):
                flag = _flag(key)
                value = _check_value(key, _coerce(key, getattr(args, key), hints[key], flag), flag)
                values[key] = _resolve_path(fields[key], value, Path.cwd())
    values.update(overrides)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _resolve_path(f: dataclasses.Field, value: Any, base: Path) -> Any:
    if not f.metadata.get("path"):
        return value
    return _absolute(value, base, hub=bool(f.metadata.get("hub")))


def config_to_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_config_dict"):  # a TrainingArguments: enums as their values
        return config.to_config_dict()
    return {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
    }


def require(condition: bool, field: str, value: Any, rule: str) -> None:
    """Raise a one-line error naming the config field when ``condition`` is false."""
    if not condition:
        raise NegprefError(f"{field}: {rule}, got {value!r}")
