"""Issue [2/6]'s acceptance check: quantize the default model, export it, and compare the perplexity that
transformers computes on the exported directory with `lowbit eval` of the same directory.

    OMP_NUM_THREADS=2 python benchmarks/export_check.py            # every case, ~15 min on 2 CPU cores
    OMP_NUM_THREADS=2 python benchmarks/export_check.py --cases gptq_w4_g64_sym fp8

Calibration: 16 x 512 tokens of WikiText-2 valid (seed 0); evaluation: the first 4 x 512-token windows of
WikiText-2 test (the GPTQ protocol: no BOS, non-overlapping windows), fp32 on CPU for both. transformers runs
what the directory's quantization_config asks for (compressed-tensors: decompression, then the configured
activation quantization as the package's fake-quant). Where transformers cannot load a directory, the error is
recorded and, for compressed-tensors, the package's own decompressor unpacks the tensors and transformers runs
the dense result instead (column "transformers ran").
W8A8 int8: transformers' CPU path quantizes activations with compressed-tensors' step absmax / 127.5 (codes in
[-128, 127]); lowbit uses absmax / 127 ([-127, 127]), as vLLM's int8 kernel does. The extra row evaluates lowbit's
layers with the package's step, which isolates that difference.
Writes benchmarks/results/export_check.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (method, options, format)
CASES = {
    "gptq_w4_g64_sym": ("gptq", dict(bits=4, group_size=64, sym=True), "compressed-tensors"),
    "gptq_w4_g64_sym_actorder": ("gptq", dict(bits=4, group_size=64, sym=True, act_order=True, static_groups=True),
                                 "compressed-tensors"),
    "gptq_w4_g64_asym": ("gptq", dict(bits=4, group_size=64), "compressed-tensors"),
    "awq_w4_g64_sym": ("awq", dict(bits=4, group_size=64, sym=True), "compressed-tensors"),
    "awq_w4_g64_asym": ("awq", dict(bits=4, group_size=64), "compressed-tensors"),
    "smoothquant_w8a8": ("smoothquant", {}, "compressed-tensors"),
    "fp8": ("fp8", {}, "compressed-tensors"),
    "gptq_w4_g64_sym_actorder_gptqfmt": ("gptq", dict(bits=4, group_size=64, sym=True, act_order=True), "gptq"),
    "awq_w4_g64_asym_awqfmt": ("awq", dict(bits=4, group_size=64), "awq"),
}


class HFAdapter:
    """A transformers model with the call signature lowbit.eval.evaluate uses: ids [1, S] -> logits [1, S, V]."""

    def __init__(self, hf):
        self.hf, self.config, self.device = hf, hf.config, hf.device

    def __call__(self, ids):
        return self.hf(ids).logits


def dense_via_package(d: Path, out: Path) -> Path:
    """A compressed-tensors directory decompressed by the package's own compressor (fp32 weights)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file, save_file

    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (scheme,) = [QuantizationScheme.model_validate(s) for s in qc["config_groups"].values()]
    comp = BaseCompressor.load_from_registry(qc["format"])
    sd = load_file(str(d / "model.safetensors"))
    for m in sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")}):
        local = {k.rsplit(".", 1)[1]: sd.pop(k) for k in list(sd) if k.rsplit(".", 1)[0] == m}
        bias = local.pop("bias", None)
        local["weight_scale"] = local["weight_scale"].float()
        sd[f"{m}.weight"] = comp.decompress(local, scheme)["weight"].float()
        if bias is not None:
            sd[f"{m}.bias"] = bias
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(out / "model.safetensors"))
    return out


def with_ct_activation_step(model):
    """Every Int8Linear of `model` computing its per-token int8 activations with compressed-tensors' own step
    (absmax / 127.5, codes in [-128, 127]) instead of lowbit's (absmax / 127, [-127, 127], as vLLM's kernel):
    a direct computation on the layer's own int8 weights, to show that this step is the whole difference."""
    from lowbit.layers import Int8Linear

    def forward(layer, x):
        x2 = x.reshape(-1, layer.in_features).float()                              # [M, in]
        s = (x2.abs().amax(-1, keepdim=True) / 127.5).clamp(min=1e-12)              # [M, 1]
        qx = (x2 / s).round().clamp(-128, 127) * s                                  # [M, in]
        y = qx @ layer.dequantized_weight(torch.float32).t()                        # [M, out]
        return layer._finish(y, x)

    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.forward = forward.__get__(m)
    return model


def run_case(name, method, opts, fmt, model0, tok, calib, windows, work: Path) -> dict:
    import copy

    from transformers import AutoModelForCausalLM

    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loader import load
    from lowbit.quant.api import quantize

    row = {"case": name, "method": method, "options": opts, "format": fmt}
    model = copy.deepcopy(model0)
    t0 = time.perf_counter()
    res = quantize(model, method, calib, progress=False, **opts)
    row["quantize_s"] = round(time.perf_counter() - t0, 1)
    d = work / name
    res.save(model, tok, d, format=fmt)
    del model
    ours = load(d, dtype="fp32", tokenizer=False)[0]
    row["lowbit_layer"] = type(ours.get_submodule("model.layers.0.mlp.down_proj")).__name__
    row["lowbit_ppl"] = evaluate(ours, windows, progress=False).perplexity
    if row["lowbit_layer"] == "Int8Linear":
        row["lowbit_ct_step_ppl"] = evaluate(with_ct_activation_step(ours), windows, progress=False).perplexity
    del ours
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        row["transformers_ran"] = f"AutoModelForCausalLM.from_pretrained ({fmt})"
    except Exception as e:  # recorded, not hidden: the row says what ran instead
        row["transformers_error"] = str(e).strip().splitlines()[-1][:300]
        if fmt != "compressed-tensors":
            return row
        hf = AutoModelForCausalLM.from_pretrained(str(dense_via_package(d, work / f"{name}_dense")),
                                                  dtype=torch.float32).eval()
        row["transformers_ran"] = "dense weights from compressed-tensors' own decompressor"
    with torch.inference_mode():
        row["transformers_ppl"] = evaluate(HFAdapter(hf), windows, progress=False).perplexity
    row["rel_diff"] = abs(row["transformers_ppl"] - row["lowbit_ppl"]) / row["lowbit_ppl"]
    if "lowbit_ct_step_ppl" in row:
        row["rel_diff_ct_step"] = abs(row["transformers_ppl"] - row["lowbit_ct_step_ppl"]) / row["lowbit_ct_step_ppl"]
    return row


def installed(*names: str) -> dict[str, str]:
    """Versions of the packages present (the GPTQ/AWQ rows run where gptqmodel is, the others need not have it)."""
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=str(RESULTS / "export_check"))
    args = ap.parse_args()

    from lowbit.models.loader import load
    from lowbit.quant.api import calibration_windows
    from lowbit.text import eval_windows, read_text, tokenize_text

    model0, tok = load(None, dtype="fp32")
    calib = calibration_windows(tok, SHARED / "wikitext-2" / "valid.txt", 16, 512, 0)
    windows = eval_windows(tokenize_text(tok, read_text(SHARED / "wikitext-2-raw" / "wiki.test.raw")), 512, 4)
    work = Path(tempfile.mkdtemp(prefix="export_check_"))
    rows = []
    try:
        for name in args.cases:
            method, opts, fmt = CASES[name]
            print(f"[{name}] {method} {opts} -> {fmt}", flush=True)
            rows.append(run_case(name, method, opts, fmt, model0, tok, calib, windows, work))
            print("   ", {k: v for k, v in rows[-1].items() if k not in ("options",)}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
            "cpu": platform.processor() or platform.machine(), "command": " ".join(["python"] + sys.argv),
            "calibration": "WikiText-2 valid, 16 x 512, seed 0", "eval": "WikiText-2 test, first 4 x 512 windows",
            "versions": installed("torch", "transformers", "compressed-tensors", "gptqmodel", "optimum")}
    out = Path(args.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out.with_suffix(".json"))
    lines = [f"# Export check: transformers vs `lowbit eval` on the same directory", "",
             f"{meta['date']}, {meta['device']}, `{meta['command']}`; {meta['versions']}", "",
             f"Calibration {meta['calibration']}; perplexity on {meta['eval']} (fp32).", "",
             "| case | format | lowbit layer | lowbit ppl | transformers ppl | rel. diff | transformers ran |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tp = f"{r['transformers_ppl']:.4f}" if "transformers_ppl" in r else "-"
        rd = f"{r['rel_diff']:.1e}" if "rel_diff" in r else "-"
        ran = r.get("transformers_ran", "") + (f" (direct load failed: {r['transformers_error']})"
                                               if "transformers_error" in r else "")
        lines.append(f"| {r['case']} | {r['format']} | {r['lowbit_layer']} | {r['lowbit_ppl']:.4f} | {tp} | {rd} "
                     f"| {ran} |")
        if "lowbit_ct_step_ppl" in r:
            lines.append(f"| {r['case']}, lowbit with compressed-tensors' activation step (absmax/127.5) | "
                         f"{r['format']} | {r['lowbit_layer']} | {r['lowbit_ct_step_ppl']:.4f} | {tp} | "
                         f"{r.get('rel_diff_ct_step', float('nan')):.1e} | same |")
    md_tmp = out.with_suffix(".md.tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    md_tmp.replace(out.with_suffix(".md"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
