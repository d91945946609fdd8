"""Config parsing shared by every stage: TRL's TrlParser (as TRL's own scripts use it).

Precedence: dataclass defaults < `--config file.yaml` < command-line flags. Unknown keys raise
(TrlParser / HfArgumentParser); wrong types raise here, naming the field, since argparse does not
convert values that come from YAML.
"""

from __future__ import annotations

import dataclasses
import typing


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


def _is(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse(config_cls, argv=None):
    """Parse `--config file.yaml` and flags into one `config_cls` instance."""
    from trl import TrlParser

    (cfg,) = TrlParser((config_cls,)).parse_args_and_config(argv)
    return cfg
