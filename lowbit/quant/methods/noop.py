"""`noop`: keeps every Linear as it is. Runs the whole layer walk, so it checks the walk itself."""
from __future__ import annotations

from lowbit.quant.registry import Method, Quantized, register


@register("noop")
class Noop(Method):
    """No options (the base MethodConfig); every Linear stays itself."""

    def quantize_linear(self, ctx, name, linear, stats):
        return Quantized(linear)
