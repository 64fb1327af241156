"""One Linear layer as ONNX nodes: float, QDQ (DequantizeLinear on the stored codes) or QOperator
(onnxruntime's MatMulNBits / MatMulInteger), writing lowbit's codes, scales and zero points as they are.

Every builder maps x [B, S, in] to y [B, S, out] in the graph's float dtype. Weights are laid out [in, out]
(K x N) for MatMul, which is also the layout onnxruntime's own quantizers give DequantizeLinear (blockwise
along axis 0) and what its graph optimizer fuses into MatMulNBits / MatMulInteger.

  float nn.Linear, SparseLinear (dense), FakeQuantLinear without activation quant: W^T as an initializer.
  WeightOnlyLinear  qdq: int4/uint4 or int8/uint8 codes, DequantizeLinear per channel (axis 1), per tensor or
                         blockwise (axis 0, block_size = group size); an integer zero point as uint4/uint8.
                    qoperator: MatMulNBits (4 or 8 bits, a power-of-two group >= 16; uint8 blobs, scales
                         [N, k_blocks], zero points packed, or real-valued for GGUF-style offsets);
                         8-bit per channel / per tensor: MatMulInteger, activations quantized as for W8A8.
  Int8Linear (W8A8) qdq: QuantizeLinear -> DequantizeLinear on the activation (lowbit's per-token int8, or its
                         static scale when calibrated; DynamicQuantizeLinear with act_quant "dynamic"), int8
                         DequantizeLinear per channel on the weight.
                    qoperator: the same activation codes as uint8 (zero point 128) -> MatMulInteger -> Cast -> Mul.
Anything else is refused by check_layer in one line (the layer's name and why).
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.onnx_builder import MS_DOMAIN, GraphBuilder
from lowbit.kernels.primitives import pack
from lowbit.layers import FakeQuantLinear, FP8Linear, Int8Linear, MixedInt8Linear, SparseLinear, WeightOnlyLinear

FORMS = ("qdq", "qoperator")
ACT_QUANT = ("per-token", "dynamic")
INT_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _pow2_group(g: int) -> bool:
    return g >= 16 and g & (g - 1) == 0


def _ragged_only(layer: WeightOnlyLinear) -> bool:
    """True when g_idx only spells out contiguous groups (a short last group), not an act-order permutation."""
    gs = layer.spec.group_size
    return gs > 0 and torch.equal(layer.g_idx.long().cpu(), torch.arange(layer.in_features) // gs)


def check_layer(name: str, layer: nn.Module, form: str) -> None:
    """Raise LowbitError (one line: the layer and the reason) if `layer` has no exact ONNX `form`."""
    def refuse(why: str):
        raise LowbitError(f"{name}: cannot export as ONNX {form}: {why}")

    if form not in FORMS:
        raise LowbitError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if type(layer) is nn.Linear or isinstance(layer, SparseLinear):
        return
    if isinstance(layer, FakeQuantLinear):
        if layer.act is not None:
            refuse(f"fake-quantized {layer.act} activations are a simulation, not a format "
                   f"(quantize with w8a8 or smoothquant for int8 activations)")
        return
    if isinstance(layer, WeightOnlyLinear):
        s = layer.spec
        if layer.g_idx is not None and not _ragged_only(layer):
            refuse("act-order g_idx (a permuted group per input column) has no ONNX form; "
                   "quantize with --static-groups or without --act-order")
        if form == "qdq":
            if s.bits not in (4, 8):
                refuse(f"{s.bits}-bit codes: ONNX opset 21 has 4- and 8-bit integer types only")
            if s.float_zero:
                refuse("a real-valued zero point (--zero-point float): DequantizeLinear takes an integer zero "
                       "point (use --form qoperator: MatMulNBits takes a float one)")
            return
        if s.bits not in (4, 8):
            refuse(f"{s.bits}-bit codes: MatMulNBits is exported for 4 and 8 bits")
        if s.group_size > 0 and not _pow2_group(s.group_size):
            refuse(f"group size {s.group_size}: MatMulNBits needs a power-of-two block of at least 16")
        if s.group_size <= 0 and (s.bits == 4 or s.float_zero):
            refuse(f"{'per-tensor' if s.group_size == 0 else 'per-channel'} {s.tag}: MatMulNBits needs blocks "
                   f"(a power-of-two group size >= 16) and MatMulInteger 8-bit integer zero points "
                   f"(use --form qdq)")
        return
    if isinstance(layer, Int8Linear):
        return
    if isinstance(layer, FP8Linear):
        refuse("fp8 weights: onnxruntime's CPU kernels have no fp8 matmul")
    if isinstance(layer, MixedInt8Linear):
        refuse("LLM.int8()'s outlier columns are chosen per input at run time; ONNX has no such op")
    refuse(f"unsupported layer type {type(layer).__name__}")


def linear(g: GraphBuilder, x: str, layer: nn.Module, name: str, form: str) -> str:
    """Nodes computing layer(x): x [B, S, in] -> [B, S, out], in the graph's float dtype."""
    check_layer(name, layer, form)
    if isinstance(layer, WeightOnlyLinear):
        y = (_weight_only_qdq if form == "qdq" else _weight_only_qop)(g, x, layer, name)
    elif isinstance(layer, Int8Linear):
        y = (_int8_qdq if form == "qdq" else _int8_qop)(g, x, layer, name)
    else:
        w = layer.weight if isinstance(layer, (nn.Linear, FakeQuantLinear)) else layer.dequantized_weight()
        wt = g.init_float(f"{name}.weight_t", _np(w.float()).T)                          # [in, out]
        y = g.op("MatMul", [x, wt], f"{name}/MatMul")
    if layer.bias is not None:
        y = g.op("Add", [y, g.init_float(f"{name}.bias", _np(layer.bias.float()))], f"{name}/Add")
    return y


# ----------------------------------------------------------------------------- weight-only

def _int_codes(g: GraphBuilder, name: str, q: np.ndarray, bits: int, signed: bool) -> str:
    """Codes as an int4/uint4/int8/uint8 initializer of q's shape (int4: packed two per byte, low nibble first,
    the layout ONNX gives 4-bit tensors and lowbit's pack writes)."""
    dt = INT_TYPES[(bits, signed)]
    if bits == 8:
        return g.init(name, q.astype(np.int8 if signed else np.uint8))
    raw = _np(pack(torch.from_numpy(q.astype(np.int16).reshape(1, -1)), 4)).tobytes()  # [ceil(numel/2)]
    return g.init_packed(name, dt, list(q.shape), raw)


def _weight_only_qdq(g: GraphBuilder, x: str, layer: WeightOnlyLinear, name: str) -> str:
    s = layer.spec
    q = _np(layer.codes()).T                                   # [in, out] = [K, N]
    scale = _np(layer.scale.float()).T                         # [G, rows]
    zero = None if layer.zero is None else _np(layer.zero.float()).T.round()  # [G, rows], integers
    attrs = {}
    if s.group_size > 0:              # blockwise along K (axis 0); a short last block where g does not divide K
        attrs = dict(axis=0, block_size=s.group_size)
    elif s.group_size == -1:          # one scale per output channel (axis 1)
        scale, zero = scale[0], None if zero is None else zero[0]                    # [N]
        attrs = dict(axis=1)
    else:                             # per tensor: scalar scale
        scale, zero = scale.reshape(()), None if zero is None else zero.reshape(())
    ins = [_int_codes(g, f"{name}.qweight", q, s.bits, s.symmetric), g.init_float(f"{name}.scale", scale)]
    if zero is not None:
        ins.append(_int_codes(g, f"{name}.zero_point", zero, s.bits, False))
    w = g.op("DequantizeLinear", ins, f"{name}/DequantizeLinear", **attrs)          # [K, N] float
    return g.op("MatMul", [x, w], f"{name}/MatMul")


def _weight_only_qop(g: GraphBuilder, x: str, layer: WeightOnlyLinear, name: str) -> str:
    s = layer.spec
    if s.group_size <= 0:             # 8-bit per channel / per tensor: onnxruntime's dynamic MatMulInteger form
        return _matmul_integer(g, x, layer, name)
    K, N, bs, bits = layer.in_features, layer.out_features, s.group_size, s.bits
    k_blocks = -(-K // bs)
    q = layer.codes().to(torch.int16)                          # [N, K]
    if s.symmetric:                   # MatMulNBits codes are unsigned with a default zero point 2^(bits-1)
        q = q + (1 << (bits - 1))
    # Pad K to whole blocks; the padded codes meet no input column (A has K columns), their value is moot.
    q = torch.nn.functional.pad(q, (0, k_blocks * bs - K))    # [N, k_blocks*bs]
    blob = _np(pack(q, bits)).reshape(N, k_blocks, bs * bits // 8)                   # [N, k_blocks, blob]
    ins = [x, g.init(f"{name}.qweight", blob), g.init_float(f"{name}.scales", _np(layer.scale.float()))]
    if s.float_zero:                  # real = q*scale + zero  ==  (q - zp)*scale with zp = -zero/scale
        zp = -(layer.zero.double() / layer.scale.double())                           # [N, k_blocks]
        ins.append(g.init_float(f"{name}.zero_points", _np(zp)))
    elif not s.symmetric:             # integer zero points packed like B: [N, ceil(k_blocks*bits/8)]
        ins.append(g.init(f"{name}.zero_points", _np(pack(layer.zero.float().round().to(torch.int16), bits))))
    return g.op("MatMulNBits", ins, f"{name}/MatMulNBits", domain=MS_DOMAIN, K=K, N=N, bits=bits,
                block_size=bs, accuracy_level=g.accuracy_level)


# ----------------------------------------------------------------------------- 8-bit activations

def _as_f32(g: GraphBuilder, x: str, name: str) -> str:
    # DynamicQuantizeLinear takes float32 only; an fp16 graph goes through a Cast.
    return x if g.dtype == "fp32" else g.op("Cast", [x], f"{name}/CastIn", to=TensorProto.FLOAT)


def _to_graph_float(g: GraphBuilder, y: str, name: str) -> str:
    return y if g.dtype == "fp32" else g.op("Cast", [y], f"{name}/CastOut", to=g.float_type)


def _act_quant(g: GraphBuilder, x: str, layer, name: str, unsigned: bool):
    """x [B, S, K] -> (codes, scale, zero point or None) of its 8-bit activations:
      static act_scale   lowbit's int8 symmetric codes with its calibrated scale;
      g.act_quant "per-token"  lowbit's int8 symmetric codes, scale absmax/127 per row (a blocked QuantizeLinear
                         with one block of K), code for code;
      g.act_quant "dynamic"    DynamicQuantizeLinear: uint8 asymmetric, one scale per tensor (what onnxruntime's
                         quantize_dynamic writes and fuses into DynamicQuantizeMatMul), not lowbit's rounding.
    unsigned (for MatMulInteger): lowbit's int8 codes as uint8 with zero point 128 (the same values, q + 128 in
    [0, 255]): onnxruntime documents int8 x int8 QOperator as slow on x86-64 (measured: 1.3 ms against 60 us for
    one 1536 x 576 decode matmul) and runs uint8 x int8 fast. QDQ keeps int8 codes with no zero point: with a
    per-row zero point onnxruntime 1.32 fuses DequantizeLinear -> MatMul into a MatMulIntegerToFloat that then
    refuses it at run time."""
    xf = _as_f32(g, x, name)
    act_scale = getattr(layer, "act_scale", None)
    def zero():
        return g.const(128, np.uint8) if unsigned else g.const(0, np.int8)

    if act_scale is not None:
        s = g.const(float(act_scale.reshape(())), np.float32)
        return g.op("QuantizeLinear", [xf, s, zero()], f"{name}/QuantizeLinear"), s, zero()
    if g.act_quant == "dynamic":
        return g.op("DynamicQuantizeLinear", [xf], f"{name}/DynamicQuantizeLinear", n_out=3)
    amax = g.op("ReduceMax", [g.op("Abs", [xf], f"{name}/Abs"), g.const([-1])], f"{name}/AbsMax", keepdims=1)
    s = g.op("Div", [amax, g.const(127.0, np.float32)], f"{name}/ActScale")                 # [B, S, 1]
    # an all-zero row gets scale 1 (as lowbit's qparams): its codes are 0 either way, and nothing divides by 0
    s = g.op("Where", [g.op("Greater", [s, g.const(0.0, np.float32)], f"{name}/Positive"), s,
                       g.const(1.0, np.float32)], f"{name}/SafeScale")
    blocked = dict(axis=-1, block_size=layer.in_features)
    if not unsigned:   # int8 codes, zero point 0 (opset 21's output_dtype)
        return g.op("QuantizeLinear", [xf, s], f"{name}/QuantizeLinear", output_dtype=TensorProto.INT8,
                    **blocked), s, None
    zp = g.op("Expand", [zero(), g.op("Shape", [s], f"{name}/ScaleShape")], f"{name}/ZeroPoint")  # [B, S, 1]: a
    return g.op("QuantizeLinear", [xf, s, zp], f"{name}/QuantizeLinear", **blocked), s, zp  # blocked zp is
    # shaped like its scale


def _w8_channel(layer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """8-bit codes [K, N], scale [N] or [], zero point [N] / [] or None, signed?"""
    if isinstance(layer, Int8Linear):
        return _np(layer.qweight).T, _np(layer.w_scale.float()).reshape(-1), None, True
    s = layer.spec
    shape = (-1,) if s.group_size == -1 else ()
    zero = None if layer.zero is None else _np(layer.zero.float()).round().reshape(shape).astype(np.uint8)
    return _np(layer.codes()).T, _np(layer.scale.float()).reshape(shape), zero, s.symmetric


def _int8_qdq(g: GraphBuilder, x: str, layer: Int8Linear, name: str) -> str:
    xq, xs, xz = _act_quant(g, x, layer, name, unsigned=False)
    per_row = g.act_quant == "per-token" and getattr(layer, "act_scale", None) is None
    attrs = dict(axis=-1, block_size=layer.in_features) if per_row else {}
    xd = g.op("DequantizeLinear", [xq, xs] + ([xz] if xz else []), f"{name}/DequantizeLinearAct", **attrs)
    xd = _to_graph_float(g, xd, name)
    q, scale, _, _ = _w8_channel(layer)
    w = g.op("DequantizeLinear", [g.init(f"{name}.qweight", q), g.init_float(f"{name}.scale", scale)],
             f"{name}/DequantizeLinear", axis=1)                                      # [K, N] float
    return g.op("MatMul", [xd, w], f"{name}/MatMul")


def _int8_qop(g: GraphBuilder, x: str, layer: Int8Linear, name: str) -> str:
    return _matmul_integer(g, x, layer, name)


def _matmul_integer(g: GraphBuilder, x: str, layer, name: str) -> str:
    """MatMulInteger on 8-bit weights per channel (or per tensor), activations quantized on the fly; the int32
    sums times act_scale * w_scale, the node chain onnxruntime fuses into MatMulIntegerToFloat."""
    q, scale, zero, signed = _w8_channel(layer)
    xq, xs, xz = _act_quant(g, x, layer, name, unsigned=True)
    per_row = g.act_quant == "per-token" and getattr(layer, "act_scale", None) is None
    # MatMulInteger takes a scalar (or per-row 1-D) a_zero_point: the per-token one is 128 on every row
    ins = [xq, g.init(f"{name}.qweight", q.astype(np.int8 if signed else np.uint8)),
           g.const(128, np.uint8) if per_row else xz]
    if zero is not None:
        ins.append(g.init(f"{name}.zero_point", zero))
    acc = g.op("MatMulInteger", ins, f"{name}/MatMulInteger")                         # [B, S, N] int32
    accf = g.op("Cast", [acc], f"{name}/Cast", to=TensorProto.FLOAT)
    both = g.op("Mul", [xs, g.init(f"{name}.scale", scale.astype(np.float32))], f"{name}/MulScales")
    # [N] or [B, S, N] (a per-token scale [B, S, 1] times the per-channel [N])
    return _to_graph_float(g, g.op("Mul", [accf, both], f"{name}/Mul"), name)
