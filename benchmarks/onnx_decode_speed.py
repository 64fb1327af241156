"""onnxruntime CPU decode speed of lowbit's ONNX exports of the default model (batch 1, greedy, KV cache).

    python benchmarks/onnx_decode_speed.py [--prompt 128] [--new 128] [--threads 2] [--json OUT]

Each config is quantized with lowbit (no calibration), exported, loaded in onnxruntime with `--threads`
intra-op threads, and timed: prefill of a `--prompt`-token WikiText-2 prompt, then `--new` greedy tokens
(EOS ignored). `acc` is the MatMulNBits accuracy level (export attribute for qoperator; for qdq the session
option onnxruntime applies when it fuses DequantizeLinear -> MatMul into MatMulNBits; 4 = int8 activations).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from lowbit.export.onnx_graph import export_onnx
from lowbit.export.onnx_run import OnnxDecoder
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.text import read_text, tokenize_text

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# name: (quantization (method, options) or None, form, dtype, export accuracy_level, session qdq accuracy level)
CONFIGS = {
    "fp32": (None, "qdq", "fp32", 0, None),
    "fp16": (None, "qdq", "fp16", 0, None),
    "w4g32-qdq (ORT default: fused, int8 A)": (("rtn", dict(bits=4, group_size=32, sym=True)), "qdq", "fp32", 0, None),
    "w4g32-qdq (fused, fp32 A)": (("rtn", dict(bits=4, group_size=32, sym=True)), "qdq", "fp32", 0, 1),
    "w4g32-qoperator acc0": (("rtn", dict(bits=4, group_size=32, sym=True)), "qoperator", "fp32", 0, None),
    "w4g32-qoperator acc4": (("rtn", dict(bits=4, group_size=32, sym=True)), "qoperator", "fp32", 4, None),
    "w8ch-qdq": (("rtn", dict(bits=8, group_size=-1, sym=True)), "qdq", "fp32", 0, None),
    "w8a8-qdq per-token": (("w8a8", {}), "qdq", "fp32", 0, None),
    "w8a8-qoperator per-token": (("w8a8", {}), "qoperator", "fp32", 0, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=None, help="comma-separated subset of the config names")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model, tok = load(None, dtype="fp32")
    prompt = tokenize_text(tok, read_text(WIKI)[:20_000])[:a.prompt].tolist()
    names = a.configs.split(",") if a.configs else list(CONFIGS)
    rows, quantized = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            q, form, dtype, acc, qdq_acc = CONFIGS[name]
            m = model
            if q is not None:
                key = json.dumps(q, sort_keys=True)
                if key not in quantized:
                    quantized[key] = copy.deepcopy(model)
                    quantize(quantized[key], q[0], None, progress=False, **q[1])
                m = quantized[key]
            rep = export_onnx(m, tok, Path(tmp) / str(len(rows)), form=form, dtype=dtype, accuracy_level=acc)
            t0 = time.perf_counter()
            dec = OnnxDecoder(rep["path"], threads=a.threads, qdq_accuracy_level=qdq_acc)
            session_s = time.perf_counter() - t0
            dec.generate(prompt[:16], 4, stop_at_eos=False)                       # warm-up
            st = dec.generate(prompt, a.new, stop_at_eos=False)
            row = {"config": name, "form": form, "dtype": dtype, "onnx_MB": round(rep["bytes"] / 1e6, 1),
                   "export_s": round(rep["seconds"], 1), "session_s": round(session_s, 2),
                   "prefill_ms": round(st.prefill_seconds * 1e3, 1), "decode_tok_s": round(st.decode_tokens_per_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"prompt": a.prompt, "new": a.new, "threads": a.threads, "rows": rows},
                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
