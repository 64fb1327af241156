"""One-call analysis of a model config (`analyse`) and its rich rendering (`render`)."""
from __future__ import annotations

import numbers
from typing import Any

from lowbit.analysis.flops import decode_flops, generation_flops_summary, prefill_flops
from lowbit.analysis.gpus import get_gpu
from lowbit.analysis.memory import (activation_memory, check_positive, kv_cache_summary,
                                    param_counts, weight_memory, weight_memory_table)
from lowbit.analysis.roofline import decode_bound, op_table, prefill_bound
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError


def analyse(cfg: ModelConfig, batch: int = 1, seqlen: int = 2048, gpu: str = "h100",
            weight_bits: int = 16, group_size: int = 128, kv_bytes: float = 2) -> dict[str, Any]:
    """Memory, FLOPs, intensity and roofline numbers for `cfg`, as a JSON-serialisable dict.

    batch/seqlen: b sequences of s tokens (KV cache, activations, prefill; decode at context s).
    weight_bits: 32, 16 or int-k (1..8) group quantization of the block Linears (`group_size`).
    kv_bytes: bytes per K/V cache element (2 = fp16, 1 = int8/fp8).
    Generation FLOPs use a prompt of s//2 tokens followed by s - s//2 new tokens.
    """
    if not isinstance(cfg, ModelConfig):
        raise LowbitError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    b, s = check_positive("batch", batch), check_positive("seqlen", seqlen)
    if isinstance(kv_bytes, bool) or not isinstance(kv_bytes, numbers.Real) or kv_bytes <= 0:
        raise LowbitError(f"kv_bytes: must be a positive number of bytes per element, got {kv_bytes!r}")
    spec = get_gpu(gpu)
    selected = weight_memory(cfg, weight_bits, group_size)   # validates weight_bits/group_size
    # Activations and the math stay 16-bit unless the whole model is fp32; weight-only
    # quantization dequantizes to bf16 inside the kernel, so bf16 peak is the right roof.
    act_bytes = 4 if weight_bits == 32 else 2
    compute = "fp32" if weight_bits == 32 else "bf16"
    w_elem = act_bytes if weight_bits >= 16 else selected["bits_per_quantized_weight"] / 8
    sizes = {"weight_bytes": w_elem, "act_bytes": act_bytes, "kv_bytes": kv_bytes,
             "head_weight_bytes": act_bytes}
    pc = param_counts(cfg)
    kv = kv_cache_summary(cfg, b, s, kv_bytes)
    prompt = max(1, s // 2)
    new = max(1, s - prompt)
    dec = decode_bound(cfg, spec, b, s, weight_bits=weight_bits, group_size=group_size,
                       kv_bytes=kv_bytes, compute=compute)
    pre = prefill_bound(cfg, spec, b, s, weight_bits=weight_bits, group_size=group_size,
                        kv_bytes=kv_bytes, compute=compute)
    return {
        "model": {"name": cfg.name, "arch": cfg.arch, "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                  "tie_word_embeddings": cfg.tie_word_embeddings},
        "settings": {"batch": b, "seqlen": s, "gpu": spec.name, "weight_bits": weight_bits,
                     "group_size": group_size, "kv_bytes": kv_bytes, "act_bytes": act_bytes,
                     "compute": compute},
        "params_total": pc.total,
        "kv_cache_bytes": kv["bytes"],
        "kv_cache_bytes_per_token": kv["bytes_per_token"],
        "decode_tokens_per_s_bound": dec["tokens_per_s"],
        "params": pc.to_dict(),
        "weight_memory": {"table": weight_memory_table(cfg, group_size), "selected": selected},
        "kv": kv,
        "activations": activation_memory(cfg, b, s, act_bytes),
        "flops": {
            "note": "matmuls only (block linears, QK^T, PV, lm_head); 2*m*n*k each",
            "prefill": prefill_flops(cfg, s, b).to_dict(),
            "decode_step": decode_flops(cfg, s, b).to_dict(),
            "generation": generation_flops_summary(cfg, prompt, new, b),
        },
        "intensity": {
            "note": "per op instance; bytes = weights + inputs + outputs, each moved once",
            "prefill": op_table(cfg, "prefill", b, s, spec, compute, **sizes),
            "decode": op_table(cfg, "decode", b, s, spec, compute, **sizes),
        },
        "roofline": {"gpu": spec.to_dict(), "compute": compute,
                     "ridge_point": spec.ridge_point(compute), "decode": dec, "prefill": pre},
    }


# ---------------------------------------------------------------- rendering

def _scaled(x: float, units: list[str], base: float = 1000.0) -> str:
    x = float(x)
    i = 0
    while abs(x) >= base and i < len(units) - 1:
        x /= base
        i += 1
    return f"{x:.0f} {units[i]}" if i == 0 else f"{x:.2f} {units[i]}"


def fmt_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 B), as datasheets and the KV-cache literature use."""
    return _scaled(n, ["B", "KB", "MB", "GB", "TB", "PB"])


def fmt_flops(n: float) -> str:
    return _scaled(n, ["FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"])


def fmt_count(n: float) -> str:
    return _scaled(n, ["", "K", "M", "B", "T"]).strip()


def fmt_time(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.2f} {unit}"
    return f"{t * 1e9:.1f} ns"


def render(report: dict[str, Any], console: Any = None) -> None:
    """Print an `analyse` report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m, st = report["model"], report["settings"]
    console.print(f"[bold]{m['name'] or m['arch']}[/]: d={m['hidden_size']} L={m['num_layers']} "
                  f"heads={m['num_heads']} kv_heads={m['num_kv_heads']} head_dim={m['head_dim']} "
                  f"ffn={m['intermediate_size']} vocab={m['vocab_size']} tied={m['tie_word_embeddings']}"
                  f" | batch={st['batch']} seqlen={st['seqlen']} weights={st['weight_bits']}-bit "
                  f"kv={st['kv_bytes']} B/elem | {st['gpu']}")

    p = report["params"]
    t = Table(title="Parameters")
    for c in ("component", "params", "share"):
        t.add_column(c, justify="left" if c == "component" else "right")
    for k in ("embeddings", "attention", "mlp", "norms", "lm_head"):
        note = " (tied: 0)" if k == "lm_head" and m["tie_word_embeddings"] else ""
        t.add_row(k + note, f"{p[k]:,}", f"{100 * p[k] / p['total']:.1f}%")
    t.add_row("[bold]total[/]", f"[bold]{p['total']:,}[/] ({fmt_count(p['total'])})", "100%")
    console.print(t)

    t = Table(title="Weight memory", caption="int-k: " + report["weight_memory"]["table"]["int4"]["quantized"]
              + f"; group size {st['group_size']}, fp16 scale + k-bit zero per group")
    for c in ("format", "quantized params", "quantized weights", "scales+zeros", "16-bit rest",
              "total", "bits/param"):
        t.add_column(c, justify="left" if c == "format" else "right")
    for name, w in report["weight_memory"]["table"].items():
        t.add_row(name, fmt_count(w["quantized_params"]), fmt_bytes(w["quantized_weight_bytes"]),
                  fmt_bytes(w["scale_bytes"] + w["zero_bytes"]), fmt_bytes(w["unquantized_bytes"]),
                  fmt_bytes(w["total_bytes"]), f"{w['bits_per_param']:.2f}")
    console.print(t)

    kv, act = report["kv"], report["activations"]
    t = Table(title=f"KV cache and activations (b={st['batch']}, s={st['seqlen']})",
              caption="activations: inference, one layer live at a time")
    t.add_column("item")
    t.add_column("bytes", justify="right")
    t.add_row("KV cache", fmt_bytes(kv["bytes"]))
    t.add_row("KV cache per token", fmt_bytes(kv["bytes_per_token"]))
    t.add_row(f"KV cache if MHA ({kv['num_heads']} kv heads)", fmt_bytes(kv["mha_bytes"]))
    t.add_row("GQA saving", f"{kv['saving_factor']:.1f}x ({fmt_bytes(kv['saved_bytes'])})")
    for k in ("residual_stream", "qkv", "mlp_inner", "attention_scores", "logits",
              "layer_peak_fused_attention", "layer_peak_naive_attention",
              "peak_estimate_fused_attention", "peak_estimate_naive_attention"):
        t.add_row(k.replace("_", " "), fmt_bytes(act[k]))
    console.print(t)

    fl = report["flops"]
    g = fl["generation"]
    t = Table(title="FLOPs (matmuls only)")
    for c in ("forward", "linear", "attention", "lm_head", "total"):
        t.add_column(c, justify="left" if c == "forward" else "right")
    rows = [(f"prefill s={st['seqlen']}", fl["prefill"]), (f"decode step @ {st['seqlen']}", fl["decode_step"]),
            (f"generate {g['new_tokens']} after {g['prompt_len']}, KV cache", g["with_cache"]),
            (f"generate {g['new_tokens']} after {g['prompt_len']}, no cache", g["without_cache"])]
    for name, f in rows:
        t.add_row(name, *(fmt_flops(f[k]) for k in ("linear", "attention", "lm_head", "total")))
    t.caption = f"without cache / with cache = {g['ratio_without_over_with']:.1f}x"
    console.print(t)

    rf = report["roofline"]
    t = Table(title=f"Arithmetic intensity per op on {st['gpu']} (ridge {rf['ridge_point']:.0f} FLOP/B)",
              caption="one instance (one layer); bytes = weights + inputs + outputs")
    for c in ("op", "prefill FLOPs", "prefill FLOP/B", "prefill", "decode FLOPs", "decode FLOP/B",
              "decode"):
        t.add_column(c, justify="left" if c == "op" else "right")
    for a, d in zip(report["intensity"]["prefill"], report["intensity"]["decode"]):
        t.add_row(a["name"], fmt_flops(a["flops"]), f"{a['intensity']:.1f}", _bound_tag(a["bound"]),
                  fmt_flops(d["flops"]), f"{d['intensity']:.2f}", _bound_tag(d["bound"]))
    console.print(t)

    t = Table(title=f"Roofline bounds on {st['gpu']} ({rf['compute']})")
    for c in ("phase", "FLOPs", "bytes", "t_memory", "t_compute", "bound", "time", "tokens/s"):
        t.add_column(c, justify="left" if c == "phase" else "right")
    for name, r in ((f"prefill (b={st['batch']}, s={st['seqlen']}) lower bound", rf["prefill"]),
                    (f"decode step (b={st['batch']}, ctx={st['seqlen']}) upper bound", rf["decode"])):
        t.add_row(name, fmt_flops(r["flops"]), fmt_bytes(r["bytes"]), fmt_time(r["t_memory_s"]),
                  fmt_time(r["t_compute_s"]), _bound_tag(r["bound"]), fmt_time(r["time_s"]),
                  f"{r['tokens_per_s']:,.0f}")
    if not rf["decode"]["fits_in_memory"]:
        t.caption = "[red]weights + KV cache exceed device memory[/]"
    console.print(t)


def _bound_tag(bound: str) -> str:
    return "[yellow]memory[/]" if bound == "memory" else "[green]compute[/]"
