"""Config parsing shared by every stage: TRL's TrlParser (as TRL's own scripts use it).

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. Unknown keys raise
(TrlParser / HfArgumentParser); wrong types raise here, naming the field, since argparse does not
convert values that come from YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .errors import InputError, MissingInput


def check_types(cfg) -> None:
    """Raise TypeError naming the field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        origin = typing.get_origin(hint)
        if origin is list:
            (item,) = typing.get_args(hint)
            ok = isinstance(value, list) and all(_is(v, item) for v in value)
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            ok = any(_is(value, h) for h in typing.get_args(hint))
        else:
            ok = _is(value, hint)
        if not ok:
            raise TypeError(f"{type(cfg).__name__}.{f.name}: expected {hint}, got {value!r} ({type(value).__name__})")


def check_fields(cfg, choices: dict, at_least_one=()) -> None:
    """Raise ValueError naming the flag whose value is not among its `choices`, or is below 1."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: choose from {list(allowed)}")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be ≥ 1")


def _is(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value) raise InputError: one line at the entry
    point, naming the command and the flag, instead of the usage text. Sub-commands inherit it."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def parse(config_cls, argv=None):
    """Parse `--config file.yaml` and flags into one `config_cls` instance. A missing or unreadable
    config file, an unknown key or flag, a wrong type or a bad choice is an InputError naming it."""
    import yaml
    from trl import TrlParser

    parser = TrlParser((config_cls,))
    parser.error = ArgumentParser.error.__get__(parser)
    args = list(argv) if argv is not None else None
    config = args[args.index("--config") + 1] if args and "--config" in args[:-1] else None
    try:
        (cfg,) = parser.parse_args_and_config(args)
    except InputError:
        raise
    except FileNotFoundError as e:
        raise MissingInput(f"--config {config or e.filename}: no such file") from e
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--config {config}: {e}") from e
    except (ValueError, TypeError) as e:
        raise InputError(f"{config + ': ' if config else ''}{e}") from e
    return cfg


def read_yaml(path: str) -> dict:
    """A `--config` YAML file as a mapping; a missing, unreadable or non-mapping file is an InputError."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise MissingInput(f"--config {path}: no such file") from e
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--config {path}: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of names to values")
    return values


def parse_with_config(ap, argv=None):
    """argparse with `--config file.yaml` for the stages whose flags are not a dataclass (pairs,
    eval): YAML keys become defaults, flags override them; an unknown key raises, naming it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    ap.add_argument("--config", default=None, help="YAML file of flag values; flags given here override it")
    if known.config:
        values = read_yaml(known.config)
        dests = {a.dest: a for a in ap._actions}
        unknown = sorted(set(values) - set(dests))
        if unknown:
            raise InputError(f"{known.config}: unknown key(s) {unknown}")
        for key, value in values.items():  # YAML values take the flag's type, as on the command line
            action = dests[key]
            if action.type is not None and value is not None:
                try:
                    value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
                except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                    raise InputError(f"{known.config}: {key}: {e}") from e
            dests[key].required = False
            ap.set_defaults(**{key: value})
    args = ap.parse_args(rest if known.config else argv)
    if known.config and isinstance(getattr(args, "model", None), list):  # --model given on the CLI replaces YAML's
        yaml_models = ap.get_default("model") or []
        if len(args.model) > len(yaml_models) and args.model[:len(yaml_models)] == yaml_models:
            args.model = args.model[len(yaml_models):]
    return args
