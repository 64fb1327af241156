"""Quantization methods as plug-ins: a config dataclass + a Method class, registered by name.

A method sees the model one decoder block at a time (lowbit.quant.walk drives it):
  1. `collector(name, linear)`  -> an object whose `update(x)` sees that Linear's inputs on calibration data;
  2. `prepare_block(...)`       -> optional whole-block transforms before quantizing (AWQ / SmoothQuant scales);
  3. `quantize_linear(...)`     -> the replacement module for one Linear, from the statistics it gathered;
  4. `finish_block(...)`        -> optional training of the quantized block (ZeroQuant's LKD).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from lowbit.errors import LowbitError

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: `@register("rtn") class RTN(Method): config_cls = RTNConfig`."""
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str, **options: Any) -> "Method":
    """The registered method `name` configured from keyword options (unknown options are an error)."""
    _import_builtin_methods()
    if name not in METHODS:
        raise LowbitError(f"--method: unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise LowbitError(f"--method {name}: option {unknown[0]!r} does not apply "
                          f"(options: {', '.join(sorted(fields))})")
    return cls(cls.config_cls(**options))


def method_options(name: str) -> set[str]:
    _import_builtin_methods()
    return {f.name for f in dataclasses.fields(METHODS[name].config_cls)} if name in METHODS else set()


def _import_builtin_methods() -> None:
    import importlib
    import pkgutil

    import lowbit.quant.methods as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")


@dataclass
class MethodConfig:
    """Base of every method's config; fields map one to one to `lowbit quantize` options."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Method:
    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = False
    true_sequential: bool = False          # quantize the layout's sequential groups one after another
    needs_targets: bool = False            # finish_block reads the float block's outputs
    shares_input_stats: bool = False       # collector() depends on the inputs only: one per shared input

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def collector(self, name: str, linear: nn.Linear):
        """Statistics object for this Linear's inputs (`update(x [..., in])`), or None."""
        return None

    def prepare_block(self, block: nn.Module, layout, inputs, block_kwargs: dict) -> None:
        """Transform the float block before its Linears are quantized (default: nothing)."""

    def quantize_linear(self, name: str, linear: nn.Linear, stats) -> nn.Module:
        raise NotImplementedError

    def finish_block(self, qblock: nn.Module, inputs, targets, block_kwargs: dict) -> None:
        """Adjust the quantized block given the float block's outputs `targets` (default: nothing)."""

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.cfg.to_dict()}
