"""Every registered method's config fields as `lowbit quantize` flags, from the fields themselves.

A field declared with `registry.option(default, help)` becomes the flag `--field-name`: a bool gets
--x/--no-x, an int or float field that type, a Literal[...] field its choices; anything else (a str, or
SmoothQuant's alpha: a number or 'auto') is passed as given and the config checks it. A field several
methods declare (bits, group_size, sym, observer...) is one flag whose help lists each method using it.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError
from lowbit.quant.registry import flag_name, registered_methods


@dataclass
class Flag:
    """One `lowbit quantize` flag: a config field name shared by the methods in `uses`."""
    name: str                                                    # the config field (the argparse dest)
    kwargs: dict                                                 # add_argument's type / choices / action
    uses: dict[str, tuple[str, Any]] = field(default_factory=dict)   # method -> (help, default)

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def help(self) -> str:
        """Each distinct help text with the methods (and their defaults) it belongs to."""
        by_text: dict[str, list[str]] = {}
        for method, (text, default) in self.uses.items():
            by_text.setdefault(text, []).append(f"{method}={_show(default)}")
        # argparse %-formats help strings
        return "; ".join(f"{t} [{', '.join(ms)}]" for t, ms in by_text.items()).replace("%", "%%")


def _show(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


def _kwargs(tp: Any) -> dict:
    """add_argument kwargs for a field annotated `tp` (Optional[X] as X)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    return {"type": tp} if tp in (int, float) else {}


def method_flags() -> dict[str, Flag]:
    """{field name: Flag} over every registered method's config, in method then field order."""
    flags: dict[str, Flag] = {}
    for method, cls in sorted(registered_methods().items()):
        cfg = cls.config_cls
        hints = typing.get_type_hints(cfg)
        for f in dataclasses.fields(cfg):
            if "help" not in f.metadata:
                raise LowbitError(f"{cfg.__name__}.{f.name}: declare it with registry.option(default, help)")
            flag = flags.setdefault(f.name, Flag(f.name, _kwargs(hints[f.name])))
            if flag.kwargs != _kwargs(hints[f.name]):
                raise LowbitError(f"{flag.flag}: {method} declares it with another type than "
                                  f"{', '.join(flag.uses)}")
            flag.uses[method] = (f.metadata["help"], f.default)
    return flags


def add_config_flags(group, cfg_cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass declared with registry.option (QAT's, distillation's), with
    the field's default: the CLI is generated from the config, as `lowbit quantize`'s is."""
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        if f.name in skip:
            continue
        help = f"{f.metadata['help']} (default {_show(f.default)})".replace("%", "%%")
        group.add_argument(flag_name(f.name), dest=f.name, default=f.default, help=help, **_kwargs(hints[f.name]))


def config_from_args(cfg_cls, args, **overrides):
    """cfg_cls built from the parsed flags add_config_flags made (and overrides)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls) if hasattr(args, f.name)}
    return cfg_cls(**{**values, **overrides})
