"""The decoder as an ONNX graph with a KV cache, written node by node (onnx.helper), and export_onnx.

Inputs and outputs follow the names Optimum and onnxruntime-genai use for Llama decoders, so a runtime
decodes token by token by feeding each step's present.* back as the next step's past_key_values.*:

  input_ids                      int64 [batch, sequence_length]
  attention_mask                 int64 [batch, total_sequence_length]  1 = real token, 0 = (left) padding;
                                       total = past_sequence_length + sequence_length
  position_ids                   int64 [batch, sequence_length]        RoPE positions (cumsum(mask) - 1 with
                                       left padding; past_sequence_length + arange otherwise)
  past_key_values.{i}.key/value  float [batch, kv_heads, past_sequence_length, head_dim]  (past 0 to prefill)
  -> logits                      float [batch, sequence_length, vocab]
  -> present.{i}.key/value       float [batch, kv_heads, total_sequence_length, head_dim]

Opset 21, no fused ops in the default domain: RMSNorm from primitives (Pow, ReduceMean, Add, Sqrt, Div, Mul,
in float32 as lowbit normalises: the pattern onnxruntime's optimizer fuses into SimplifiedLayerNormalization;
that op itself lives in onnxruntime's schema set, not ONNX's, so onnx.checker would reject it), RoPE from
cos/sin tables that lowbit's own rope_cos_sin computes (every rope_scaling variant exact), grouped-query
attention as broadcast MatMuls (query heads viewed [kv_heads, rep] so K/V are never copied) with a causal
mask that counts the past, SwiGLU as g * Sigmoid(g) * u, and the lm_head as Gemm(transB) on the embedding
when tied. Quantized Linears come from onnx_quant.linear.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError
from lowbit.export.onnx_builder import FLOAT_TYPES, GraphBuilder
from lowbit.export.onnx_quant import ACT_QUANT, FORMS, check_layer, linear
from lowbit.models.arch import config_to_hf
from lowbit.models.rope import rope_cos_sin

EXTERNAL_DATA_BYTES = 1_800_000_000   # protobuf's hard limit is 2 GiB; leave room for the graph itself
MODEL_FILE = "model.onnx"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _linears(model):
    """(name, module) of every Linear of the decoder blocks, in graph order."""
    for i, layer in enumerate(model.model.layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                yield f"model.layers.{i}.{part}.{n}", getattr(getattr(layer, part), n)


def check_exportable(model, form: str, dtype: str) -> None:
    """Refuse, before anything is built, what the ONNX export cannot write (one line each)."""
    if form not in FORMS:
        raise LowbitError(f"--form must be one of {', '.join(FORMS)}, got {form!r}")
    if dtype not in FLOAT_TYPES:
        raise LowbitError(f"--dtype must be one of {', '.join(FLOAT_TYPES)}, got {dtype!r}")
    if model.kv_quant is not None:
        raise LowbitError("cannot export a quantized KV cache (--kv-cache) to ONNX: present.* are float tensors")
    if getattr(model.config, "arch", "llama") not in ("llama", "mistral", "qwen2"):
        raise LowbitError(f"cannot export architecture {model.config.arch!r} to ONNX")
    for name, layer in _linears(model):
        check_layer(name, layer, form)
    if type(model.lm_head) is not torch.nn.Linear:
        raise LowbitError(f"lm_head: cannot export a quantized lm_head ({type(model.lm_head).__name__}) to ONNX")


class _Decoder:
    """Builds the graph of one LlamaForCausalLM into a GraphBuilder."""

    def __init__(self, model, g: GraphBuilder, form: str):
        self.m, self.g, self.form, self.cfg = model, g, form, model.config
        c = self.cfg
        self.H, self.Hkv, self.D = c.num_heads, c.num_kv_heads, c.head_dim
        self.rep = self.H // self.Hkv

    def rms_norm(self, x: str, norm, name: str) -> str:
        g = self.g
        # lowbit normalises in float32 and casts back before the weight (models.llama.RMSNorm): so do we.
        xf = x if g.dtype == "fp32" else g.op("Cast", [x], f"{name}/Cast", to=TensorProto.FLOAT)
        sq = g.op("Pow", [xf, g.const(2.0, np.float32)], f"{name}/Pow")
        ms = g.op("ReduceMean", [sq, g.const([-1])], f"{name}/ReduceMean", keepdims=1)     # [B, S, 1]
        rms = g.op("Sqrt", [g.op("Add", [ms, g.const(norm.eps, np.float32)], f"{name}/Add")], f"{name}/Sqrt")
        y = g.op("Div", [xf, rms], f"{name}/Div")
        if g.dtype != "fp32":
            y = g.op("Cast", [y], f"{name}/CastBack", to=g.float_type)
        return g.op("Mul", [y, g.init_float(f"{name}.weight", _np(norm.weight))], f"{name}/Mul")

    def rope(self, x: str, cos: str, sin: str, name: str) -> str:
        """x [B, h, S, D] rotated: x*cos + rotate_half(x)*sin, with rotate_half's sign folded into the table."""
        g = self.g
        x1, x2 = g.op("Split", [x], f"{name}/Split", n_out=2, axis=-1, num_outputs=2)     # [B, h, S, D/2] x2
        swapped = g.op("Concat", [x2, x1], f"{name}/Concat", axis=-1)                     # [B, h, S, D]
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}/MulCos"),
                            g.op("Mul", [swapped, sin], f"{name}/MulSin")], f"{name}/Add")

    def heads(self, y: str, n: int, name: str) -> str:
        g = self.g
        y = g.op("Reshape", [y, g.const([0, 0, n, self.D])], f"{name}/Reshape")          # [B, S, n, D]
        return g.op("Transpose", [y], f"{name}/Transpose", perm=[0, 2, 1, 3])            # [B, n, S, D]

    def attention(self, i: int, x: str, cos: str, sin: str, bias: str) -> str:
        g, attn, p = self.g, self.m.model.layers[i].self_attn, f"model.layers.{i}.self_attn"
        lin = {n: linear(g, x, getattr(attn, n), f"{p}.{n}", self.form) for n in ("q_proj", "k_proj", "v_proj")}
        q = self.rope(self.heads(lin["q_proj"], self.H, f"{p}/q"), cos, sin, f"{p}/q_rope")   # [B, H, S, D]
        k = self.rope(self.heads(lin["k_proj"], self.Hkv, f"{p}/k"), cos, sin, f"{p}/k_rope")  # [B, Hkv, S, D]
        v = self.heads(lin["v_proj"], self.Hkv, f"{p}/v")                                      # [B, Hkv, S, D]
        k = g.op("Concat", [f"past_key_values.{i}.key", k], f"{p}/ConcatK", axis=2,
                 outputs=[f"present.{i}.key"])                                                 # [B, Hkv, T, D]
        v = g.op("Concat", [f"past_key_values.{i}.value", v], f"{p}/ConcatV", axis=2,
                 outputs=[f"present.{i}.value"])                                               # [B, Hkv, T, D]
        # GQA: query head h uses KV head h // rep, so view the queries as [B, Hkv, rep, S, D] and broadcast K/V
        # over rep ([B, Hkv, 1, T, D]) instead of repeating them.
        q5 = g.op("Reshape", [q, g.const([0, self.Hkv, self.rep, -1, self.D])], f"{p}/q5")   # [B, Hkv, rep, S, D]
        q5 = g.op("Mul", [q5, g.fconst(1.0 / math.sqrt(self.D))], f"{p}/ScaleQ")
        k5 = g.op("Unsqueeze", [k, g.const([2])], f"{p}/k5")                                  # [B, Hkv, 1, T, D]
        kt = g.op("Transpose", [k5], f"{p}/kT", perm=[0, 1, 2, 4, 3])                         # [B, Hkv, 1, D, T]
        scores = g.op("MatMul", [q5, kt], f"{p}/QK")                                          # [B, Hkv, rep, S, T]
        probs = g.op("Softmax", [g.op("Add", [scores, bias], f"{p}/Mask")], f"{p}/Softmax", axis=-1)
        v5 = g.op("Unsqueeze", [v, g.const([2])], f"{p}/v5")                                  # [B, Hkv, 1, T, D]
        o = g.op("MatMul", [probs, v5], f"{p}/PV")                                            # [B, Hkv, rep, S, D]
        o = g.op("Reshape", [o, g.const([0, self.H, -1, self.D])], f"{p}/o4")                # [B, H, S, D]
        o = g.op("Transpose", [o], f"{p}/oT", perm=[0, 2, 1, 3])                              # [B, S, H, D]
        o = g.op("Reshape", [o, g.const([0, 0, self.H * self.D])], f"{p}/o3")                # [B, S, H*D]
        return linear(g, o, attn.o_proj, f"{p}.o_proj", self.form)

    def mlp(self, i: int, x: str) -> str:
        g, mlp, p = self.g, self.m.model.layers[i].mlp, f"model.layers.{i}.mlp"
        gate = linear(g, x, mlp.gate_proj, f"{p}.gate_proj", self.form)                      # [B, S, F]
        up = linear(g, x, mlp.up_proj, f"{p}.up_proj", self.form)                            # [B, S, F]
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/Sigmoid")], f"{p}/SiLU")
        return linear(g, g.op("Mul", [silu, up], f"{p}/Mul"), mlp.down_proj, f"{p}.down_proj", self.form)

    def rope_tables(self) -> tuple[str, str]:
        """cos, sin [B, 1, S, D] gathered by position_ids from tables lowbit's rope_cos_sin computed."""
        g, m = self.g, self.m
        pos = torch.arange(self.cfg.max_position_embeddings)[None]                            # [1, P]
        cos, sin = rope_cos_sin(pos, m.inv_freq.cpu(), m.rope_attn_scale, torch.float32)      # [1, 1, P, D]
        half = self.D // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's -x2 sign, in the table
        cos_t = g.init_float("rope.cos", _np(cos[0, 0]))                                      # [P, D]
        sin_t = g.init_float("rope.sin_signed", _np(sin[0, 0]))                               # [P, D]
        out = []
        for t, n in ((cos_t, "cos"), (sin_t, "sin")):
            e = g.op("Gather", [t, "position_ids"], f"rope/Gather_{n}", axis=0)              # [B, S, D]
            out.append(g.op("Unsqueeze", [e, g.const([1])], f"rope/Unsqueeze_{n}"))         # [B, 1, S, D]
        return out[0], out[1]

    def mask_bias(self) -> str:
        """0 where query s may see key t (t <= past + s and attention_mask[b, t] == 1), a large negative
        elsewhere: [B, 1, 1, S, T], broadcast over the [B, Hkv, rep, S, T] scores."""
        g = self.g
        s_len = g.op("Squeeze", [g.op("Shape", ["input_ids"], "mask/ShapeS", start=1, end=2)], "mask/S")
        t_len = g.op("Squeeze", [g.op("Shape", ["attention_mask"], "mask/ShapeT", start=1, end=2)], "mask/T")
        past = g.op("Sub", [t_len, s_len], "mask/Past")
        k_pos = g.op("Range", [g.const(0), t_len, g.const(1)], "mask/KeyPos")                 # [T]
        q_pos = g.op("Range", [past, t_len, g.const(1)], "mask/QueryPos")                     # [S]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0])], "mask/K2"),
                                      g.op("Unsqueeze", [q_pos, g.const([1])], "mask/Q2")], "mask/Causal")  # [S, T]
        real = g.op("Cast", ["attention_mask"], "mask/Real", to=TensorProto.BOOL)             # [B, T]
        real = g.op("Unsqueeze", [real, g.const([1, 2, 3])], "mask/Real5")                   # [B, 1, 1, 1, T]
        allowed = g.op("And", [causal, real], "mask/Allowed")                                 # [B, 1, 1, S, T]
        # Finite, so a row with no visible key (a left-pad query) softmaxes to uniform rather than NaN; in
        # fp16 small enough that score + it cannot overflow to -inf.
        neg = -1e9 if g.dtype == "fp32" else -3e4
        return g.op("Where", [allowed, g.fconst(0.0), g.fconst(neg)], "mask/Bias")

    def build(self) -> onnx.ModelProto:
        g, m, c = self.g, self.m, self.cfg
        ft = g.float_type
        emb = g.init_float("model.embed_tokens.weight", _np(m.model.embed_tokens.weight))   # [V, d]
        x = g.op("Gather", [emb, "input_ids"], "embed/Gather", axis=0)                        # [B, S, d]
        cos, sin = self.rope_tables()
        bias = self.mask_bias()
        for i in range(c.num_layers):
            layer = m.model.layers[i]
            h = self.rms_norm(x, layer.input_layernorm, f"model.layers.{i}.input_layernorm")
            x = g.op("Add", [x, self.attention(i, h, cos, sin, bias)], f"model.layers.{i}/AttnResidual")
            h = self.rms_norm(x, layer.post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm")
            x = g.op("Add", [x, self.mlp(i, h)], f"model.layers.{i}/MlpResidual")
        x = self.rms_norm(x, m.model.norm, "model.norm")
        x2 = g.op("Reshape", [x, g.const([-1, c.hidden_size])], "lm_head/Flatten")          # [B*S, d]
        tied = m.lm_head.weight is m.model.embed_tokens.weight
        w = emb if tied else g.init_float("lm_head.weight", _np(m.lm_head.weight))           # [V, d]
        y = g.op("Gemm", [x2, w], "lm_head/Gemm", transB=1)                                    # [B*S, V]
        shape = g.op("Concat", [g.op("Shape", ["input_ids"], "lm_head/Shape"), g.const([c.vocab_size])],
                     "lm_head/OutShape", axis=0)
        g.op("Reshape", [y, shape], "lm_head/Reshape", outputs=["logits"])                  # [B, S, V]

        kv = ["batch", self.Hkv, "past_sequence_length", self.D]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", ft, ["batch", "sequence_length", c.vocab_size])]
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ft, kv))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", ft, ["batch", self.Hkv, "total_sequence_length", self.D]))
        return g.model(inputs, outputs, c.name or "lowbit-decoder", "lowbit")


def _nbytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def export_onnx(model, tok, out_dir: str | Path, form: str = "qdq", dtype: str = "fp32", *,
                overwrite: bool = False, accuracy_level: int = 0, act_quant: str = "per-token") -> dict:
    """Write `model` (float or lowbit-quantized) as an ONNX decoder with a KV cache into `out_dir`:
    model.onnx (+ model.onnx.data past 1.8 GB), config.json and the tokenizer. form: "qdq" or "qoperator"
    (how quantized layers are written, see onnx_quant); dtype: "fp32" or "fp16" activations and float weights;
    accuracy_level: MatMulNBits' attribute (0: A stays float); act_quant: W8A8 activations, "per-token"
    (lowbit's int8 rounding) or "dynamic" (DynamicQuantizeLinear, see onnx_quant). onnx.checker runs before
    anything is renamed into place. Returns {"path", "seconds", "bytes", "nodes", "ops"}."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LowbitError(f"-o {out_dir}: already exists (pass --force to replace it)")
    check_exportable(model, form, dtype)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LowbitError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
    if act_quant not in ACT_QUANT:
        raise LowbitError(f"--act-quant must be one of {', '.join(ACT_QUANT)}, got {act_quant!r}")
    t0 = time.perf_counter()
    g = GraphBuilder(dtype, accuracy_level, act_quant)
    with torch.no_grad():
        proto = _Decoder(model, g, form).build()
    proto.metadata_props.extend([onnx.StringStringEntryProto(key=k, value=v) for k, v in
                                 (("lowbit.form", form), ("lowbit.dtype", dtype))])
    big = _nbytes(proto) > EXTERNAL_DATA_BYTES
    with atomic_dir(out_dir) as tmp:
        path = tmp / MODEL_FILE
        if big:   # protobuf cannot hold > 2 GiB: weights go to one side file, the checker reads from the path
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=MODEL_FILE + ".data", size_threshold=1024)
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(path))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        if tok is not None:
            tok.save_pretrained(str(tmp))
        nbytes = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(MODEL_FILE))
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"path": out_dir / MODEL_FILE, "seconds": time.perf_counter() - t0, "bytes": nbytes,
            "nodes": len(proto.graph.node), "ops": ops}
