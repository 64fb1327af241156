"""Quantized drop-in replacements for nn.Linear (CPU reference paths; GPU kernels reuse the buffers).

  WeightOnlyLinear  WkA16: k-bit codes packed along the input dim + per-group scale/zero.
  Int8Linear        W8A8 int8: per-channel weights, per-token dynamic (or static) activations, int32 sums.
  FP8Linear         W8A8 fp8 e4m3: torch._scaled_mm on CUDA sm >= 8.9, an fp32 emulation elsewhere.
  MixedInt8Linear   LLM.int8(): int8 with outlier input features multiplied in float.
  FakeQuantLinear   quantize-dequantize simulation: the reference the real layers are tested against.
  SparseLinear      pruned weights: N:M in the compressed layout (values + positions), or dense with zeros.

Every class: Cls(in_features, out_features, <options>, bias=True, dtype=..., device=None) allocates empty
buffers (device="meta" works; then load_state_dict(sd, assign=True)); layer_config() gives JSON-able
constructor kwargs that build_layer() turns back into a layer; nbytes() counts stored bytes.
"""
from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.int8_matmul import INT8_SYM
from lowbit.layers.base import _QuantLinear
from lowbit.layers.fake import FakeQuantLinear
from lowbit.layers.fp8 import FP8Linear
from lowbit.layers.int8 import Int8Linear
from lowbit.layers.mixed_int8 import MixedInt8Linear, outlier_columns
from lowbit.layers.sparse import SparseLinear
from lowbit.layers.weight_only import WeightOnlyLinear

# kind (as written in a checkpoint's quantization config) -> class
LAYER_CLASSES: dict[str, type[_QuantLinear]] = {
    c.kind: c for c in (WeightOnlyLinear, Int8Linear, FP8Linear, FakeQuantLinear, MixedInt8Linear, SparseLinear)
}


def build_layer(config: dict, device=None) -> _QuantLinear:
    """Empty layer from a layer_config() dict (e.g. read from a checkpoint's JSON); load weights next."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in LAYER_CLASSES:
        raise LowbitError(f"config kind must be one of {sorted(LAYER_CLASSES)}, got {kind!r}")
    try:
        return LAYER_CLASSES[kind](**cfg, device=device)
    except TypeError as e:  # unknown or missing option for this class
        raise LowbitError(f"config for {kind!r}: {e}") from None


def swap_linear(module: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` (e.g. "model.layers.0.self_attn.q_proj") by new; returns the old one."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = module.get_submodule(parent_name)
    except AttributeError:
        raise LowbitError(f"name {name!r}: no submodule {parent_name!r} in {type(module).__name__}") from None
    if leaf not in parent._modules:
        raise LowbitError(f"name {name!r}: {type(parent).__name__} has no child module {leaf!r}")
    old = parent._modules[leaf]
    setattr(parent, leaf, new)
    return old


__all__ = ["LAYER_CLASSES", "INT8_SYM", "FakeQuantLinear", "FP8Linear", "Int8Linear", "MixedInt8Linear",
           "SparseLinear", "WeightOnlyLinear", "build_layer", "outlier_columns", "swap_linear"]
