"""Quantization: pure primitives (`lowbit.kernels.primitives`), range observers
(`lowbit.quant.observers`) and methods built on them (`lowbit.quant.methods`).

Kept import-light on purpose: import the submodule you need.
"""
