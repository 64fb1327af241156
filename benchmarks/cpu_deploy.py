"""The CPU speed table: lowbit's own decode, llama.cpp on lowbit's GGUF exports and onnxruntime on its ONNX
exports, all in one run on the default model (SmolLM2-135M-Instruct), batch 1, `--threads` threads.

    python benchmarks/cpu_deploy.py [--threads 2] [--prompt 128] [--new 128] [--out benchmarks/results/cpu_deploy]

Prompt: the first `--prompt` tokens of the WikiText-2 test text; then `--new` greedy tokens (EOS ignored).
lowbit rows run `lowbit.generate.generate` (prefill + token-by-token decode with a contiguous KV cache), fp32
activations; each quantized format says which matmul path its layers took (lowbit.kernels.cpu_wq: `C kernel`,
lowbit's own, or `PyTorch kernel`; `dequantize`: the reference path). llama.cpp (llama-cpp-python, n_threads)
runs lowbit's own GGUF exports (lowbit.export.gguf_writer.export_gguf); onnxruntime runs lowbit's ONNX exports
(lowbit.export.onnx_graph.export_onnx). Every engine: one warm-up generation, then the better of two timed ones.
The physical limit: the machine's read bandwidth, measured in the same run (a sum over a 256 MB tensor with
the same threads); each row reports the weight bytes one decode step reads (lowbit: the kernels' packed
weights plus the float tensors; llama.cpp: the GGUF file; onnxruntime: the exported model) times its tokens/s,
as a fraction of it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.atomic import write_json_atomic, write_text_atomic
from lowbit.config import SamplingParams
from lowbit.generate import generate
from lowbit.layers import WeightOnlyLinear
from lowbit.models.loader import default_model_path, load
from lowbit.quant.api import quantize
from lowbit.text import read_text, tokenize_text

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# lowbit format -> (rtn options or None, the llama.cpp row it is compared with, how the weights relate)
FORMATS = {
    "fp32": (None, "F32", "same weights"),
    "int8-sym-g32": (dict(bits=8, group_size=32, sym=True), "Q8_0 (F32 head)", "same codes (Q8_0 grid)"),
    "int8-sym-ch": (dict(bits=8, group_size=-1, sym=True), "Q8_0 (F32 head)", "8-bit per channel vs Q8_0 (g32)"),
    "int4-sym-g32": (dict(bits=4, group_size=32, sym=True), "Q4_0 (F32 head)", "same codes (Q4_0 grid)"),
    "int4-asym-g32": (dict(bits=4, group_size=32), "Q4_1 (F32 head)", "same codes (integer zero as Q4_1 offset)"),
    "int4-fzp-g32": (dict(bits=4, group_size=32, zero_point="float"), "Q4_1 (F32 head)", "same codes (Q4_1 grid)"),
    "int4-asym-g64": (dict(bits=4, group_size=64), "Q4_1 (F32 head)", "4-bit g64 vs Q4_1 (g32)"),
}
# llama.cpp rows: name -> (GGUF type, head type (None: the exporter's default), lowbit format exported).
# lowbit runs the tied head in fp32 in every row, so the "F32 head" rows are the same weights as lowbit's;
# the last two rows have the head llama.cpp's own quantizer would give (Q8_0), for reference.
LLAMA_ROWS = {
    "F32": ("F32", None, "fp32"),
    "F16": ("F16", None, "fp32"),
    "Q8_0 (F32 head)": ("Q8_0", "F32", "int8-sym-g32"),
    "Q4_0 (F32 head)": ("Q4_0", "F32", "int4-sym-g32"),
    "Q4_1 (F32 head)": ("Q4_1", "F32", "int4-fzp-g32"),
    "Q8_0": ("Q8_0", None, "int8-sym-g32"),
    "Q4_0 (Q8_0 head)": ("Q4_0", None, "int4-sym-g32"),
}
SAME_CODES = ("fp32", "int8-sym-g32", "int4-sym-g32", "int4-fzp-g32")   # greedy output compared token by token
ONNX = {  # row name -> (lowbit format, form, accuracy level of MatMulNBits)
    "onnx fp32": ("fp32", "qdq", 0),
    "onnx int8-sym-ch qdq": ("int8-sym-ch", "qdq", 0),
    "onnx int4-sym-g32 qdq": ("int4-sym-g32", "qdq", 0),   # onnxruntime fuses DQ -> MatMul into MatMulNBits (level 4)
    "onnx int4-sym-g32 qoperator acc4": ("int4-sym-g32", "qoperator", 4),
}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def matmul_path(model) -> str:
    """Which CPU matmul the quantized layers take: a kernel name, 'dequantize', or 'mixed (...)'."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    if not layers:
        return "fp32 F.linear"
    kinds = {("C kernel" if p.kind in ("q4", "q8") else "PyTorch kernel") if p is not None else "dequantize"
             for p in (m.cpu_weight() for m in layers)}
    return kinds.pop() if len(kinds) == 1 else f"mixed ({', '.join(sorted(kinds))})"


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: packed kernel weights (or the stored buffers) plus every float
    parameter once (a tied head counted once)."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, WeightOnlyLinear):
            p = mod.cpu_weight()
            total += p.nbytes if p is not None else sum(b.numel() * b.element_size() for b in mod.buffers())
            continue
        for t in mod.parameters(recurse=False):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def read_bandwidth() -> float:
    """GB/s of a sum over a 256 MB fp32 tensor (the best of 5), with torch's thread count."""
    x = torch.rand(64 * 1024 * 1024)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def run_lowbit(model, tok, prompt: list[int], new: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    generate(model, tok, [prompt[:16]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    best = None
    for _ in range(2):
        outs, st = generate(model, tok, [prompt], params)
        if best is None or st.decode_tokens_per_s > best[1].decode_tokens_per_s:
            best = (outs[0].token_ids, st)
    ids, st = best
    return {"prefill_ms": st.prefill_seconds * 1e3, "tok_s": st.decode_tokens_per_s, "tokens": list(ids)}


def run_llama(path: Path, prompt: list[int], new: int, threads: int) -> dict:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)

    import llama_cpp
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # llama-cpp-python keeps llm.scores only with logits_all=True (which would compute every prompt row's
        # logits); the context's own buffer holds the last token's row.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))

    def once(p, n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(p)
        t1 = time.perf_counter()
        out = []
        for _ in range(n):
            t = int(np.argmax(last_logits()))
            out.append(t)
            llm.eval([t])
        return (t1 - t0) * 1e3, n / (time.perf_counter() - t1), out

    once(prompt[:16], 8)
    runs = [once(prompt, new) for _ in range(2)]
    pre, rate, out = max(runs, key=lambda r: r[1])
    llm.close()
    return {"prefill_ms": pre, "tok_s": rate, "tokens": out}


def run_onnx(path, prompt: list[int], new: int, threads: int) -> dict:
    from lowbit.export.onnx_run import OnnxDecoder
    dec = OnnxDecoder(path, threads=threads)
    dec.generate(prompt[:16], 4, stop_at_eos=False)
    best = max((dec.generate(prompt, new, stop_at_eos=False) for _ in range(2)), key=lambda s: s.decode_tokens_per_s)
    return {"prefill_ms": best.prefill_seconds * 1e3, "tok_s": best.decode_tokens_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated lowbit formats")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/cpu_deploy")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    start = loadavg()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth:.1f} GB/s ({a.threads} threads)", flush=True)
    t_start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base, tok = load(None, dtype="fp32")
    prompt = tokenize_text(tok, read_text(WIKI)[:20_000])[:a.prompt].tolist()
    models, rows = {}, []
    for fmt in a.formats.split(","):
        opts = FORMATS[fmt][0]
        m = base if opts is None else copy.deepcopy(base)
        if opts is not None:
            quantize(m, "rtn", None, progress=False, **opts)
        models[fmt] = m
        r = run_lowbit(m, tok, prompt, a.new)
        rows.append({"engine": "lowbit", "row": f"lowbit {fmt}", "format": fmt, "path": matmul_path(m),
                     "step_bytes": step_bytes(m), **r})
        print(rows[-1]["row"], f"{r['tok_s']:.1f} tok/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            from lowbit.export.gguf_writer import export_gguf
        except ImportError:
            export_gguf = None
        for name, (gt, head, src) in LLAMA_ROWS.items():
            if export_gguf is None:
                path, made = default_model_path(), "the source GGUF (no lowbit exporter)"
            elif src in models:
                path = Path(tmp) / f"{name.replace(' ', '_')}.gguf"
                export_gguf(models[src], tok, path, type=gt, source=default_model_path(), head_type=head)
                made = f"export_gguf(lowbit {src}, type={gt}" + (f", head_type={head})" if head else ")")
            else:
                continue
            r = run_llama(path, prompt, a.new, a.threads)
            rows.append({"engine": "llama.cpp", "row": f"llama.cpp {name}", "format": name, "path": made,
                         "step_bytes": path.stat().st_size, **r})
            print(rows[-1]["row"], f"{r['tok_s']:.1f} tok/s", flush=True)
        if not a.no_onnx:
            try:
                from lowbit.export.onnx_graph import export_onnx
            except ImportError:
                export_onnx = None
            for name, (fmt, form, acc) in ONNX.items():
                if export_onnx is None or fmt not in models:
                    continue
                try:
                    rep = export_onnx(models[fmt], tok, Path(tmp) / name.replace(" ", "_"), form=form, dtype="fp32",
                                      accuracy_level=acc)
                    r = {**run_onnx(rep["path"], prompt, a.new, a.threads), "step_bytes": rep["bytes"]}
                except Exception as e:  # a form the exporter refuses: say so in the table
                    r = {"prefill_ms": float("nan"), "tok_s": float("nan"), "error": str(e).splitlines()[0][:120]}
                rows.append({"engine": "onnxruntime", "row": name, "format": fmt,
                             "path": f"export_onnx(lowbit {fmt}, form={form}, accuracy_level={acc})", **r})
                print(rows[-1]["row"], f"{r['tok_s']:.1f} tok/s", flush=True)

    llama = {r["format"]: r["tok_s"] for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        r["ms_token"] = 1e3 / r["tok_s"] if r["tok_s"] == r["tok_s"] and r["tok_s"] else float("nan")
        if "step_bytes" in r:
            r["bandwidth_fraction"] = r["step_bytes"] * r["tok_s"] / 1e9 / bandwidth
        if r["engine"] == "lowbit" and FORMATS[r["format"]][1] in llama:
            gt = FORMATS[r["format"]][1]
            r["vs_llama"], r["llama_row"], r["relation"] = r["tok_s"] / llama[gt], gt, FORMATS[r["format"]][2]
        if r["engine"] == "lowbit" and "tokens" in r and r["format"] in SAME_CODES:
            other = next((o for o in rows if o["engine"] == "llama.cpp"
                          and o["format"] == FORMATS[r["format"]][1]), None)
            if other is not None:
                same = next((i for i, (x, y) in enumerate(zip(r["tokens"], other["tokens"])) if x != y), None)
                r["greedy_vs_llama"] = "identical" if same is None else f"first difference at token {same}"
    payload = {"date": t_start, "machine": {"cpu": platform.processor() or platform.machine(),
                                            "cores": os.cpu_count(), "torch": torch.__version__,
                                            "capability": torch.backends.cpu.get_cpu_capability()},
               "command": "python " + " ".join(sys.argv), "threads": a.threads, "prompt_tokens": len(prompt),
               "new_tokens": a.new, "loadavg_start": start, "loadavg_end": loadavg(), "read_bandwidth_gbs": bandwidth,
               "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}
    out = Path(a.out)
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(payload))
    print(markdown(payload))


def markdown(p: dict) -> str:
    lines = [f"# CPU decode speed: lowbit vs llama.cpp vs onnxruntime (SmolLM2-135M, batch 1, {p['threads']} threads)",
             "", f"{p['date']}; {p['machine']}; `{p['command']}`; {p['prompt_tokens']}-token WikiText-2 prompt, "
             f"{p['new_tokens']} greedy tokens; load average (1/5/15 min) at start {p['loadavg_start']}, at end "
             f"{p['loadavg_end']} (2 cores: above ~2 the machine was shared and every number is pessimistic).", "",
             "lowbit keeps the tied 49152x576 lm_head in fp32 in every row (its methods quantize the decoder's "
             "Linears only), so each lowbit row is compared with llama.cpp on a GGUF export of the same model with "
             "the head kept F32 (`--head-type F32`): the same weights, and for the rows marked 'same codes' the "
             "same greedy tokens. The last two llama.cpp rows have the Q8_0 head the exporter writes by default "
             "(what llama.cpp's own quantizer does), which reads 4x fewer head bytes per token.", "",
             f"Measured read bandwidth: {p['read_bandwidth_gbs']:.1f} GB/s ({p['threads']} threads).", "",
             "| engine | row | matmul path / file | tok/s | ms/token | prefill ms | MB read/token | of bandwidth "
             "| vs llama.cpp | greedy vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        vs = f"{r['vs_llama']:.0%} of {r['llama_row']} ({r['relation']})" if "vs_llama" in r else ""
        note = r.get("error", "")
        mb = f"{r['step_bytes'] / 1e6:.0f}" if "step_bytes" in r else ""
        frac = f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else ""
        lines.append(f"| {r['engine']} | {r['row']} | {r['path']}{' — ' + note if note else ''} | {r['tok_s']:.1f} | "
                     f"{r['ms_token']:.2f} | {r['prefill_ms']:.0f} | {mb} | {frac} | {vs} | "
                     f"{r.get('greedy_vs_llama', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
