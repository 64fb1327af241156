"""`noop`: keeps every Linear as it is. Runs the whole layer walk, so it checks the walk itself."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.quant.registry import Method, MethodConfig, register


@dataclass
class NoopConfig(MethodConfig):
    pass


@register("noop")
class Noop(Method):
    config_cls = NoopConfig

    def quantize_linear(self, name, linear, stats):
        return linear
