"""Quantization methods as plug-ins: a config dataclass + a Method class, registered by name.

A method sees the model one decoder block at a time (lowbit.quant.walk drives it); every hook gets the
block's BlockContext `ctx` (lowbit.quant.context: its index, the block, the architecture record, a runner):
  1. `prepare_block(ctx, xs)`   -> optional whole-block transforms before quantizing (AWQ / SmoothQuant scales);
  2. `collector(ctx, name, linear)` -> an object whose `update(x)` sees that Linear's inputs on calibration data;
  3. `quantize_linear(ctx, name, linear, stats)` -> Quantized: the replacement module for one Linear and its
     numbers for the report;
  4. `finish_block(ctx, xs, targets)` -> optional training of the quantized block (ZeroQuant's LKD).
What a block hook measures or chooses is returned (a BlockReport) and lands in the walk's QuantReport.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.context import BlockContext

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
        takes = ", ".join(flag_name(f) for f in sorted(fields)) or "none"
        raise LowbitError(f"{flag_name(unknown[0])}: option {unknown[0]!r} does not apply to --method {name} "
                          f"(its options: {takes})")
    return cls(cls.config_cls(**options))


def flag_name(field_name: str) -> str:
    """The `lowbit quantize` flag of a config field: max_shrink -> --max-shrink."""
    return "--" + field_name.replace("_", "-")


def option(default: Any, help: str) -> Any:
    """A config field with the help text of its `lowbit quantize` flag (lowbit.quant.options makes the flags:
    type and choices come from the field's annotation, e.g. Literal["int", "float"])."""
    return field(default=default, metadata={"help": help})


def registered_methods() -> dict[str, type["Method"]]:
    """Every registered method by name (the built-in ones imported first)."""
    _import_builtin_methods()
    return dict(METHODS)


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
    """Base of every method's config; each field (declared with `option`) is a `lowbit quantize` flag."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Quantized:
    """What quantize_linear returns: the module replacing the Linear, and numbers for its report row."""
    layer: nn.Module
    extra: dict = field(default_factory=dict)      # -> LayerReport.extra (AWQ's α, GPTQ's loss, ...)


@dataclass
class BlockReport:
    """What prepare_block / finish_block report about one block: an entry for QuantReport.blocks (what the
    method chose or measured there; the walk adds the block index) and numbers added to the `extra` of
    the block's layer rows ({linear name: {key: value}})."""
    entry: dict = field(default_factory=dict)
    layer_extra: dict[str, dict] = field(default_factory=dict)


class Method:
    """A quantization method: per decoder block, what it collects about each Linear's inputs, how it
    transforms the block, what replaces each Linear and how it adjusts the quantized block. The hooks get
    the block's BlockContext and return what they report; state a method keeps between blocks is
    its own (ZeroQuant's float hidden states), a block's notes between hooks go in `ctx.scratch`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = False
    true_sequential: bool = False          # quantize the layout's sequential groups one after another
    needs_targets: bool = False            # finish_block reads the float block's outputs
    needs_inputs: ClassVar[bool] = False   # finish_block reads the block's inputs (else it gets None)
    shares_input_stats: bool = False       # collector() depends on the inputs only: one per shared input

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def prepare_block(self, ctx: BlockContext, xs: torch.Tensor) -> BlockReport | None:
        """Transform the float block before its Linears are quantized, given its inputs xs [N, S, d]
        (default: nothing)."""
        return None

    def collector(self, ctx: BlockContext, name: str, linear: nn.Linear):
        """Statistics object for this Linear's inputs (`update(x [..., in])`), or None."""
        return None

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear, stats) -> Quantized:
        raise NotImplementedError

    def finish_block(self, ctx: BlockContext, xs: torch.Tensor | None,
                     targets: torch.Tensor | None) -> BlockReport | None:
        """Adjust the quantized block given its inputs xs (when needs_inputs) and the float block's outputs
        `targets` (when needs_targets), both [N, S, d] (default: nothing)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.cfg.to_dict()}
