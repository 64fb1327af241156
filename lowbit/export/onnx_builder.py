"""A small ONNX graph builder: nodes and initializers accumulated in order, unique names, typed constants.

The decoder graph (onnx_graph.py) and the quantized-weight builders (onnx_quant.py) write through it with
`onnx.helper`, so every node the export emits is spelled out in lowbit's own code.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21              # blockwise DequantizeLinear (block_size) and the int4/uint4 types arrived in opset 21
MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}


class GraphBuilder:
    """Nodes + initializers of one graph whose floating tensors are `dtype` ("fp32" or "fp16")."""

    def __init__(self, dtype: str, accuracy_level: int = 0, act_quant: str = "per-token"):
        self.dtype = dtype
        self.act_quant = act_quant            # W8A8 activations: "per-token" (lowbit's) or "dynamic" (ORT's)
        self.accuracy_level = accuracy_level  # MatMulNBits' attribute: 0 keeps A in float, 4 lets the CPU use int8
        self.float_type, self.np_float = FLOAT_TYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.uses_ms = False  # whether a com.microsoft contrib op was emitted (its opset must be imported)

    def fresh(self, base: str) -> str:
        """A tensor/node name not used yet, `base` itself when free."""
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer from a numpy array (its dtype kept) and return its name."""
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_float(self, name: str, array) -> str:
        """An initializer in the graph's float dtype (fp32 or fp16)."""
        return self.init(name, np.asarray(array, dtype=np.float32).astype(self.np_float))

    def init_packed(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        """An initializer given as raw bytes (int4/uint4: two codes per byte, the first in the low nibble)."""
        name = self.fresh(name)
        self.inits.append(helper.make_tensor(name, data_type, dims, raw, raw=True))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (scalar or 1-D list), shared by every node that needs the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("const", arr)
        return self._consts[key]

    def fconst(self, value) -> str:
        """A float constant in the graph's dtype."""
        return self.const(value, self.np_float)

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs):
        """Append a node; returns its output name (or the list of them when n_out > 1)."""
        node_name = self.fresh(name)
        outs = outputs or [self.fresh(f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out")
                           for i in range(n_out)]
        if domain == MS_DOMAIN:
            self.uses_ms = True
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs, outputs, graph_name: str, producer: str) -> onnx.ModelProto:
        """The ModelProto: opset 21 (+ com.microsoft 1 when a contrib op is used), IR version 10."""
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        imports = [helper.make_opsetid("", OPSET)]
        if self.uses_ms:
            imports.append(helper.make_opsetid(MS_DOMAIN, 1))
        # IR 10 is what opset 21 needs (int4/uint4 types); onnxruntime >= 1.17 reads it.
        return helper.make_model(graph, opset_imports=imports, ir_version=10, producer_name=producer)
