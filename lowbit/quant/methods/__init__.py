"""Quantization methods; each module registers itself with lowbit.quant.registry."""
