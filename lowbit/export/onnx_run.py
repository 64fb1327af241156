"""Run an exported ONNX decoder on onnxruntime (CPU): one forward, or greedy generation with its KV cache.

For the tests and benchmarks, and as the smallest example of driving the exported graph: prefill the prompt
with empty past_key_values, then feed one token per step with the previous step's present.* as past.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.generate import GenerationStats

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class DecodeStats(GenerationStats):
    """lowbit.generate's timing record, plus the generated token ids."""
    tokens: list[int] = field(default_factory=list)


class OnnxDecoder:
    """An onnxruntime session on DIR/model.onnx (or the .onnx file itself) written by export_onnx.

    qdq_accuracy_level: onnxruntime's optimizer fuses a 4-bit QDQ DequantizeLinear -> MatMul into MatMulNBits
    and, by default (None), gives it accuracy level 4: the activations are quantized to int8 inside the
    matmul, which the QDQ graph itself does not say. 1 keeps them in fp32 (the graph's own numerics)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 qdq_accuracy_level: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        file = path / "model.onnx" if path.is_dir() else path
        if not file.is_file():
            raise LowbitError(f"{file}: no such ONNX model file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if qdq_accuracy_level is not None:
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(qdq_accuracy_level))
        self.session = ort.InferenceSession(str(file), opts, providers=providers or ["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise LowbitError(f"{file}: not a decoder with a KV cache (no past_key_values.* inputs)")
        self.num_layers = len(past) // 2
        _, self.kv_heads, _, self.head_dim = past[0].shape
        self.float = _NP_TYPES[past[0].type]
        cfg_file = file.parent / "config.json"
        eos = json.loads(cfg_file.read_text()).get("eos_token_id") if cfg_file.is_file() else None
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """past_key_values.* of length 0, for the prefill."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.float)  # [B, Hkv, 0, D]
        return {f"past_key_values.{i}.{k}": z for i in range(self.num_layers) for k in ("key", "value")}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """ids [B, S] after `past` (dict of past_key_values.*; None: empty) -> (logits float32 [B, S, V],
        the next step's past). attention_mask [B, past + S] (default all ones); positions follow from it."""
        ids = np.asarray(ids, np.int64)
        B, S = ids.shape
        past = past or self.empty_past(B)
        P = past["past_key_values.0.key"].shape[2]
        mask = np.ones((B, P + S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, P:]                   # [B, S], left padding aware
        outs = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
        names = [o.name for o in self.session.get_outputs()]
        nxt = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outs[1:])}
        return outs[0].astype(np.float32), nxt

    def generate(self, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> DecodeStats:
        """Greedy decoding of one prompt: the token ids after it, with prefill and decode timings."""
        if not prompt or max_new_tokens < 1:
            raise LowbitError("generate needs a non-empty prompt and max_new_tokens >= 1")
        st = DecodeStats(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        logits, past = self.forward(np.asarray([prompt]))
        st.prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            st.tokens.append(tok)
            if (stop_at_eos and tok in self.eos) or step == max_new_tokens - 1:
                break
            logits, past = self.forward(np.asarray([[tok]]), past)
            st.decode_steps += 1
        st.decode_seconds = time.perf_counter() - t1 if st.decode_steps else 0.0
        return st
